"""``dtop info`` and the model summary."""

import json

from dtop.cli.main import main
from dtop.models import build_model
from dtop.models.info import count_flops, count_parameters


def test_parameter_parts_add_up_and_locality_is_counted():
    model = build_model("dtop_tiny")
    counts = count_parameters(model)
    assert sum(counts[p] for p in ("stem", "encoder", "locality", "head")) == counts["total"]
    hidden = 4 * 64  # mlp ratio 4, width 64; 2 blocks with a 3x3 depth-wise conv + bias
    assert counts["locality"] == 2 * (hidden * 9 + hidden)
    none = count_parameters(build_model("dtop_tiny", ["locality=none"]))
    assert none["locality"] == 0 and none["total"] == counts["total"] - counts["locality"]


def test_flops_grow_with_the_input():
    model = build_model("dtop_tiny")
    small, large = count_flops(model, 64, 64), count_flops(model, 128, 128)
    assert small > 0
    assert 3.5 < large / small < 5.0  # about 4x the pixels (attention grows a little faster)


def test_info_cli_json_and_table(capsys, tmp_path):
    assert main(["info", "dtop_tiny", "--size", "64x96", "--json", "dim=32"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["descriptor_dim"] == 32 and summary["tapped_layers"] == [2, 3]
    assert summary["input_size"] == [64, 96]
    assert main(["info", "cls_tiny"]) == 0
    assert "GFLOPs" in capsys.readouterr().out


def test_info_of_a_checkpoint_and_bad_input(capsys, tmp_path):
    from dtop.models import save_checkpoint

    path = save_checkpoint(build_model("dtop_tiny"), tmp_path / "m.safetensors")
    assert main(["info", str(path), "--size", "64"]) == 0
    assert "64-d" in capsys.readouterr().out
    assert main(["info", "dtop_tiny", "layers=[9]"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["info", "dtop_tiny", "--size", "abc"]) == 2
