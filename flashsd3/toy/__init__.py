"""A toy world small enough for a CPU: procedural shapes with captions (data.py), a tiny MMDiT teacher with
learnt attribute tokens (model.py, train.py), and its evaluator (evaluate.py: classifier adherence and a
Frechet distance in the classifier's features). `scripts/toy.py` runs the whole experiment."""
