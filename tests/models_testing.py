"""Shared by the model tests (tests/engine/models/): a backbone checkpoint that must fail to load."""
import pytest
import torch

from engine.models import build_model, load_pretrained_backbone


def load_error(tmp_path, state, model_name, filename="bad.pth"):
    """Save `state` as `filename`, load it into `model_name`'s backbone: -> the error message, after checking it
    names the file and that nothing was loaded."""
    path = tmp_path / filename
    torch.save(state, path)
    model = build_model(model_name, 3)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_pretrained_backbone(model, path)
    for k, v in model.backbone.state_dict().items():  # nothing was loaded
        assert torch.equal(v, before[k]), k
    msg = str(err.value)
    assert filename in msg
    return msg
