"""`suretrap merge`: a LoRA adapter folded into its base model, saved as a plain checkpoint."""

from __future__ import annotations

import json
import os

import torch
from typer.testing import CliRunner

from suretrap.cli import app
from suretrap.models import load_model
from suretrap.run import MERGE_FILE


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _random_adapter(tiny_model_dir, path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = load_model(str(tiny_model_dir), precision="fp32")
    # init_lora_weights=False: B is random too, so the adapter changes the logits
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.save_pretrained(path, safe_serialization=True)
    return model.eval()


def test_merged_checkpoint_gives_the_adapters_logits(tmp_path, tiny_model_dir):
    peft_model = _random_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    res = CliRunner().invoke(app, ["merge", "--model", str(tiny_model_dir), "--adapter",
                                   str(tmp_path / "adapter"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]  # no temporary left
    assert out.stat().st_mode & 0o055 == 0o055 & ~_umask()  # readable like any new directory
    record = json.loads((out / MERGE_FILE).read_text())
    assert record["base_model"] == str(tiny_model_dir) and len(record["adapter_weights_sha256"]) == 64

    ids = torch.tensor([[1, 42, 7, 300, 5, 9, 1000]])
    merged = load_model(str(out), precision="fp32")
    base = load_model(str(tiny_model_dir), precision="fp32")
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter matters, so the check below can fail
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_merge_errors_are_one_line_and_leave_nothing(tmp_path, tiny_model_dir):
    runner = CliRunner()
    out = tmp_path / "merged"
    missing = runner.invoke(app, ["merge", "--model", str(tiny_model_dir), "--adapter",
                                  str(tmp_path / "nope"), "--out", str(out)])
    assert missing.exit_code == 2 and "adapter_config.json" in missing.output
    assert len(missing.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor a temporary directory

    out.mkdir()
    exists = runner.invoke(app, ["merge", "--model", str(tiny_model_dir), "--adapter",
                                 str(tmp_path / "nope"), "--out", str(out)])
    assert exists.exit_code == 2 and "already exists" in exists.output
