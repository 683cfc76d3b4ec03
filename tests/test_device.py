"""ser.device: where and in what precision models run (no GPU here: what CUDA reports is monkeypatched)."""
import pytest
import torch

from conftest import TINY_ARCH
from ser.corpora import EMOTIONS
from ser.models import build_model


def test_precision_auto_uses_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    from ser import device

    cpu = torch.device("cpu")
    assert device.autocast_dtype(cpu, "float32") is None
    assert device.autocast_dtype(cpu, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(device, "_native_bfloat16", lambda: False)
    assert device.autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(device, "_native_bfloat16", lambda: True)
    assert device.autocast_dtype(cpu, "auto") == torch.bfloat16
    assert device.autocast_dtype(torch.device("cuda"), "float32") == torch.float16
    with pytest.raises(ValueError, match="precision"):
        device.autocast_dtype(cpu, "float16")


def test_device_and_mixed_precision_follow_what_cuda_reports(monkeypatch):
    """No GPU here: CUDA's answer is monkeypatched, and the choices that follow it are checked."""
    from ser import device
    from ser.device import pick_device
    from ser.training import one_cycle
    from ser.util import UserError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") and pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="CUDA is not available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cuda:1") == torch.device("cuda:1")
    gpu = pick_device("auto")
    for precision in ("float32", "bfloat16", "auto"):  # on a GPU: float16 whatever the CPU setting says
        assert device.autocast_dtype(gpu, precision) == torch.float16
    model = build_model(TINY_ARCH, 32, len(EMOTIONS))
    recipe = {"lr": 0.01, "weight_decay": 0.0, "warmup_fraction": 0.3}
    assert one_cycle(model, recipe, 10, torch.float16)[2].is_enabled()  # float16 needs its loss scaled
    for dtype in (torch.bfloat16, None):
        assert not one_cycle(model, recipe, 10, dtype)[2].is_enabled()


@pytest.mark.parametrize("native, expected", [(True, "bfloat16"), (False, "int8")])
def test_the_encoder_runs_auto_in_the_faster_reduced_precision_of_the_cpu(monkeypatch, native, expected):
    import ser.device

    monkeypatch.setattr(ser.device, "_native_bfloat16", lambda: native)
    assert ser.device.encoder_precision("auto") == expected
    assert [ser.device.encoder_precision(p) for p in ("float32", "bfloat16", "int8")] == ["float32", "bfloat16", "int8"]
    assert ser.device.autocast_dtype(torch.device("cpu"), "int8") is None  # the CNN stays float32
    with pytest.raises(ValueError, match="precision must be one of"):
        ser.device.encoder_precision("float16")
    # on a GPU the encoder runs in float16, or float32 when asked (the features stage)
    assert [ser.device.encoder_precision(p, "cuda") for p in ("auto", "bfloat16", "int8", "float32")] == [
        "float16", "float16", "float16", "float32"]


def test_the_gpu_is_chosen_automatically_and_torch_is_not_asked_where_no_nvidia_device_is(monkeypatch):
    import ser.device

    monkeypatch.setattr(ser.device, "cuda_visible", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: (_ for _ in ()).throw(AssertionError("asked")))
    assert ser.device.chosen_device("auto") == "cpu" and ser.device.chosen_device("cpu") == "cpu"
    monkeypatch.setattr(ser.device, "cuda_visible", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ser.device.chosen_device("auto") == "cuda" and ser.device.chosen_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without a working CUDA
    assert ser.device.chosen_device("auto") == "cpu"


def test_a_model_on_a_gpu_has_its_encoder_run_there_and_the_workers_compute_the_rest(tiny_checkpoint, monkeypatch):
    from ser.trained import TrainedModel

    trained = TrainedModel.load(tiny_checkpoint)
    assert trained.extractor().encoder_device is None  # on the CPU: in each worker
    trained.device = torch.device("cuda")  # what load(path, cuda) sets; nothing runs here
    assert trained.extractor("auto").encoder_device == "cuda"
