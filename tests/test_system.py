import json

import torch

from bvvit.system import (
    ISA_FLAGS,
    distribution_version,
    library_versions,
    parse_cpuinfo,
    system_info,
)

SAMPLE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_vnni amx_tile amx_int8

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse
"""


def test_system_info_keys_and_json():
    info = system_info()
    for key in ("cpu_model", "logical_cores", "usable_cores", "torch_threads", "isa_flags",
                "cpu_capability", "python", "platform", "cuda_available",
                "cuda_device_name", "libraries"):
        assert key in info, key
    assert info["torch_threads"] == torch.get_num_threads()
    assert info["logical_cores"] >= 1
    assert isinstance(info["cpu_model"], str)
    assert set(info["isa_flags"]) <= set(ISA_FLAGS)
    assert info["cuda_available"] == torch.cuda.is_available()
    json.dumps(info)


def test_parse_cpuinfo_takes_first_processor():
    model, flags = parse_cpuinfo(SAMPLE_CPUINFO)
    assert model == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512_vnni", "amx_int8"} <= flags and "amx_bf16" not in flags
    assert parse_cpuinfo("") == (None, set())


def test_library_versions():
    versions = library_versions()
    assert versions["torch"] == torch.__version__
    assert versions["numpy"] is not None
    for package in ("torchvision", "timm", "onnx", "onnxruntime", "onnxscript",
                    "safetensors", "matplotlib"):
        assert package in versions
    assert distribution_version("surely-not-an-installed-distribution-bvvit") is None
