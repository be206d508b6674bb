"""flashsd3-lora-convert under hostile input: one line on stderr, exit code 2, and nothing outside what it
wrote changed (the folder's state compared before and after)."""
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from flashsd3 import TINY, MMDiT
from flashsd3.lora import add_lora, save_lora
from flashsd3.lora.convert import PROG, main
from helpers_files import one_error_line, tree_state


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A tiny peft adapter with random A and B, and the same as a kohya file."""
    root = tmp_path_factory.mktemp("src")
    model = MMDiT(TINY)
    add_lora(model, rank=2, alpha=2, targets="all-linear", generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    save_lora(model, root / "peft")
    save_lora(model, root / "k.safetensors", format="kohya")
    return root


def refused(tmp_path, capsys, argv, match, monkeypatch=None) -> str:
    """Run the command in tmp_path; it must exit 2 with one line matching `match` and change nothing."""
    before = tree_state(tmp_path)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's exit
        code = e.code
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    line = one_error_line(err, PROG)
    assert code == 2, err
    assert re.search(match, line), line
    assert tree_state(tmp_path) == before
    return line


def test_existing_destination_needs_overwrite(adapter, tmp_path, capsys):
    dest = tmp_path / "mine.safetensors"
    dest.write_bytes(b"the user's own file")
    refused(tmp_path, capsys, [adapter / "peft", dest, "--format", "kohya"],
            r"mine\.safetensors exists; pass --overwrite")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "adapter_config.json").write_text("{}")
    refused(tmp_path, capsys, [adapter / "peft", tmp_path / "p", "--format", "peft"], r"adapter_config\.json exists")
    assert main([str(adapter / "peft"), str(dest), "--format", "kohya", "--overwrite"]) == 0
    assert load_file(dest).keys() == load_file(adapter / "k.safetensors").keys()


def test_destination_of_another_kind(adapter, tmp_path, capsys):
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo.safetensors")
    for dest, match in ((tmp_path / "dir.safetensors", r"exists and is not a file \(a folder\)"),
                        (tmp_path / "fifo.safetensors", r"exists and is not a file \(a pipe\)"),
                        (tmp_path / "file" / "x.safetensors", r"file exists and is not a folder \(a file\)"),
                        (tmp_path / "file", r"file exists and is not a folder")):
        for flags in ([], ["--overwrite"]):
            refused(tmp_path, capsys, [adapter / "peft", dest, "--format", "kohya", *flags], match)
    refused(tmp_path, capsys, [adapter / "peft", tmp_path / "file", "--format", "peft"], r"is not a folder")
    refused(tmp_path, capsys, [tmp_path / "fifo.safetensors", tmp_path / "o", "--format", "peft"],
            r"not a file or folder \(a device, pipe or socket\)")


def test_missing_source_is_looked_up_once_or_not_at_all(adapter, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    calls = []

    def offline(repo, **kwargs):
        calls.append(repo)
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    (tmp_path / "loras").mkdir()
    refused(tmp_path, capsys, ["loras/typo", "out", "--format", "kohya"], r"LoRA not found: loras/typo")
    assert calls == []  # a path under an existing folder is a local path, never a repo id
    refused(tmp_path, capsys, ["someone/lora", "out", "--format", "kohya"], r"could not get the LoRA 'someone/lora'")
    assert calls == ["someone/lora"]  # once, not once per model preset


def test_non_finite_values_are_refused(adapter, tmp_path, capsys):
    tensors = load_file(adapter / "k.safetensors")
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    refused(tmp_path, capsys, ["nan.safetensors", "out.safetensors", "--format", "kohya"],
            rf"nan\.safetensors: LoRA tensor '{key}' holds NaN or inf")
    tensors[key][0, 0] = 1e30  # finite in float32, inf in float16
    save_file(tensors, tmp_path / "big.safetensors")
    refused(tmp_path, capsys, ["big.safetensors", "out", "--format", "kohya", "--dtype", "fp16"],
            rf"{key} holds NaN or inf \(after the cast to torch.float16")


def test_misfits_and_usage_errors_are_one_line(adapter, tmp_path, capsys):
    refused(tmp_path, capsys, [adapter / "peft", "out", "--format", "kohya", "--model-config", "sd3-medium"],
            r"adapter is for width 16, model has 1536")
    refused(tmp_path, capsys, [adapter / "peft", "out", "--format", "peft", "--model-config", "nope"],
            r"invalid choice")
    refused(tmp_path, capsys, [adapter / "peft", "out.safetensors", "--format", "peft"], r"peft layout is a folder")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    refused(tmp_path, capsys, ["junk.safetensors", "out", "--format", "kohya"], r"not a readable safetensors file")
