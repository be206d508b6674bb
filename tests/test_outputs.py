"""flashsd3.outputs: names, the lazy plan and its sharding, the existing-file check, file modes."""
import os
import stat
import tracemalloc

import pytest
from PIL import Image

from flashsd3.outputs import OutputError, Plan, atomic_write, check_out_dir, new_file_mode, save_image, slugify


def test_slugify():
    assert slugify("Café Ünïcode: a city at night!") == "cafe-unicode-a-city-at-night"
    assert slugify("x" * 50) == "x" * 40 and slugify("!!!") == "untitled"
    assert slugify("A raccoon trapped inside a glass jar full of colorful candies") == \
        "a-raccoon-trapped-inside-a-glass-jar"  # 40 characters would cut "full" to "ful"


def test_plan_names_and_seeds():
    plan = Plan(("a", "b", "c"), 3, seed=100)
    jobs = [j for batch in plan.batches(4) for j in batch]
    assert [(j.index, j.prompt, j.seed) for j in jobs] == [(k, "abc"[k // 3], 100 + k) for k in range(9)]
    assert jobs[4].filename == "00004-104-b.png"


@pytest.mark.parametrize("total_batch_world", [(9, 1, 1), (9, 2, 2), (9, 4, 2), (9, 4, 4), (7, 3, 2), (2, 4, 3)])
def test_sharding_keeps_one_process_batches(total_batch_world):
    """Rank r takes batches r, r + world, ...: every image once, in the batch a one-process run puts it in."""
    total, batch, world = total_batch_world
    plan = Plan(tuple(str(k) for k in range(total)), 1, seed=0)
    alone = [[j.index for j in b] for b in plan.batches(batch)]
    shards = [[[j.index for j in b] for b in plan.batches(batch, r, world)] for r in range(world)]
    assert sorted(b for s in shards for b in s) == alone
    assert [plan.count(batch, r, world) for r in range(world)] == [sum(map(len, s)) for s in shards]


def test_huge_plan_is_lazy(tmp_path):
    """10**18 images: planning, counting, the existing-file check and the first batch take no memory."""
    plan = Plan(("a", "b"), 10**18, seed=0)
    (tmp_path / "00000-0-a.png").write_bytes(b"")
    (tmp_path / "99999-5-a.png").write_bytes(b"")  # image 99999 has seed 99999: not a name of this plan
    tracemalloc.start()
    assert plan.total == 2 * 10**18 and plan.count(8, 1, 4) == plan.total // 4
    first = next(plan.batches(8, 3, 4))
    with pytest.raises(OutputError, match=r"1 output file\(s\) already exist .* e.g. 00000-0-a.png"):
        check_out_dir(tmp_path, plan, overwrite=False, sidecar=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert [j.index for j in first] == list(range(24, 32)) and peak < 1 << 20, peak  # under 1 MiB


def test_check_out_dir(tmp_path):
    plan = Plan(("a",), 2, seed=5)
    check_out_dir(tmp_path / "new" / "dir", plan, overwrite=False, sidecar=True)  # created
    (tmp_path / "00001-6-a.json").write_text("{}")
    check_out_dir(tmp_path, plan, overwrite=False, sidecar=False)  # a sidecar is not written without --json
    with pytest.raises(OutputError, match="00001-6-a.json"):
        check_out_dir(tmp_path, plan, overwrite=False, sidecar=True)
    check_out_dir(tmp_path, plan, overwrite=True, sidecar=True)
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="cannot write to --out"):
        check_out_dir(tmp_path / "file" / "sub", plan, overwrite=False, sidecar=False)


def test_modes_follow_umask_and_overwrite_keeps_mode(tmp_path):
    old = os.umask(0o027)
    try:
        mode = new_file_mode()
        assert mode == 0o640 and os.umask(0o027) == 0o027  # reading the umask left it as it was
        job = Plan(("a",), 1, seed=0).job(0)
        image = Image.new("RGB", (4, 4))
        save_image(image, tmp_path, job, {"steps": 4}, overwrite=False, sidecar=True, mode=mode)
        png, sidecar = tmp_path / job.filename, tmp_path / "00000-0-a.json"
        assert stat.S_IMODE(png.stat().st_mode) == stat.S_IMODE(sidecar.stat().st_mode) == 0o640
        png.chmod(0o604)
        save_image(image, tmp_path, job, {"steps": 4}, overwrite=True, sidecar=True, mode=mode)
        assert stat.S_IMODE(png.stat().st_mode) == 0o604 and stat.S_IMODE(sidecar.stat().st_mode) == 0o640
        with pytest.raises(OutputError, match="appeared while generating"):
            atomic_write(png, lambda p: open(p, "w").close(), overwrite=False, mode=mode)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-0-a.json", "00000-0-a.png"]  # no tmp left
    finally:
        os.umask(old)
