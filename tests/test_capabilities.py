"""The hardware probe on this machine, and the capability record body built from it."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from capabilities.hardware import Hardware, cpu_model, probe, probe_cuda
from capabilities.record import SCHEMA, Load, record_body, software_version
from protocols import CapabilityRecord, Decoder, encode
from runners.fake import FakeRunner


@pytest.fixture(scope="module")
def hardware() -> Hardware:
    return probe(cuda=False)


def test_probe_gives_sane_numbers(hardware: Hardware) -> None:
    assert hardware.cpu_model and hardware.cpu_model != "unknown"
    assert 1 <= hardware.physical_cores <= hardware.logical_cores
    assert 1 <= hardware.usable_cores <= hardware.logical_cores
    assert hardware.logical_cores == psutil.cpu_count()
    assert 0 < hardware.ram_available <= hardware.ram_total
    assert hardware.ram_total == psutil.virtual_memory().total
    assert hardware.cuda_devices == () and hardware.cuda_status == "skipped"


def test_openvino_lists_the_cpu_with_its_full_name(hardware: Hardware) -> None:
    cpus = [d for d in hardware.openvino_devices if d.name == "CPU"]
    assert len(cpus) == 1
    assert cpus[0].available and cpus[0].full_name.strip() and not cpus[0].reason


def test_cuda_probe_agrees_with_torch() -> None:
    import torch

    devices, status = probe_cuda()
    if torch.cuda.is_available():
        assert status == "ok" and len(devices) == torch.cuda.device_count()
        assert all(d.total_memory > 0 and d.capability >= (3, 0) for d in devices)
    else:
        assert devices == () and status == "no CUDA device"


def test_cpu_model_reads_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Test CPU @ 3.0GHz\n\n")
    assert cpu_model(cpuinfo) == "Test CPU @ 3.0GHz"


def test_cpu_model_falls_back_without_cpuinfo(tmp_path: Path) -> None:
    assert cpu_model(tmp_path / "missing") != ""


def test_describe_is_plain_data(hardware: Hardware) -> None:
    described = hardware.describe()
    assert described["cpu"]["logical_cores"] == hardware.logical_cores
    assert described["ram"] == {"total": hardware.ram_total, "available": hardware.ram_available}
    assert {"name": "CPU", "available": True}.items() <= described["openvino"][0].items()
    assert described["cuda"] == [] and described["cuda_status"] == "skipped"


def test_record_body_survives_the_wire(hardware: Hardware) -> None:
    load = Load(queue_depth={"high": 0, "normal": 2, "low": 1}, in_flight=3, ewma_latency_ms=4.5)
    body = record_body(
        hardware=hardware,
        models=[FakeRunner("a").info, FakeRunner("b", dim=4).info],
        load=load,
        addrs=["/ip4/127.0.0.1/tcp/4001"],
    )
    assert body["schema"] == SCHEMA
    assert body["software"] == {"name": "swarm-node", "version": software_version()}
    assert software_version() != "unknown"  # the project is installed in this environment
    assert [m["name"] for m in body["models"]] == ["a", "b"]
    assert body["load"]["queue_depth"]["normal"] == 2 and body["load"]["in_flight"] == 3

    decoder = Decoder()
    for frame in encode(CapabilityRecord(peer_id="peer", seq=1, ttl_s=60, body=body)):
        decoder.feed(frame)
    received = decoder.next_message()
    assert isinstance(received, CapabilityRecord)
    assert received.body == body
    # Each model's outputs travel in the record, as its inputs do.
    assert received.body["models"][1]["outputs"] == [
        {"name": "embedding", "kind": "tensor", "dtype": "float32", "shape": [-1, 4]},
        {"name": "text", "kind": "text", "shape": [1]},
    ]


def test_idle_load_has_every_priority() -> None:
    assert Load().describe() == {
        "queue_depth": {"high": 0, "normal": 0, "low": 0},
        "in_flight": 0,
        "ewma_latency_ms": None,
        "tokens_per_s": None,
    }
