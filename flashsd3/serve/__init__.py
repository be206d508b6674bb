"""flashsd3-serve: one warm pipeline behind a web page, the OpenAI Images API and AUTOMATIC1111's API.

    flashsd3-serve --demo                      # offline toy model, http://127.0.0.1:7860/
    flashsd3-serve --lora jasperai/flash-sd3   # SD3-medium + Flash SD3 (the model flags of flashsd3-sample)
    flashsd3-serve --demo --controlnet demo    # + ControlNets, chosen by name per request

Modules: cli (flags, start, signals, exit codes), limits (the caps), errors (the two JSON error shapes),
fields (declarative request checks), uploads (images from requests, checked before decoding), spec (a
request -> what to generate), controls (a request's ControlNets, checked), engine (the pipeline, adapters and
ControlNets by name, PNG metadata), worker (one thread, bounded queue, batching, progress, cancellation), app
(ASGI app: auth, body cap, page, health, metrics), openai_api, a1111 and a1111_controlnet (the APIs). The
ASGI stack (FastAPI + uvicorn) is the optional extra `serve`.
"""
