import pytest
import torch

from detkd.models.builders import build_detector
from detkd.models.checkpoint import save_checkpoint


@pytest.fixture
def teacher_ckpt(tmp_path, spec_factory, tiny_source):
    """A random-weight tiny FCOS teacher saved as a checkpoint for ``tiny_source`` (recorded AP 0.25)."""
    torch.manual_seed(0)
    teacher = build_detector(spec_factory("fcos"))
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, teacher, class_names=tiny_source.class_names, extra={"metrics": {"AP": 0.25}})
    return path, teacher.eval()
