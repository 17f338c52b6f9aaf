"""The contract: .proto files compile cleanly and the generated stubs import by absolute path."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_protos_compile_without_warnings(tmp_path):
    protos = sorted((ROOT / "protos" / "image_to_sound" / "v1").glob("*.proto"))
    assert len(protos) == 4
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *map(str, protos)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""
    assert (tmp_path / "image_to_sound" / "v1" / "orchestrator_pb2_grpc.py").exists()
    assert (tmp_path / "image_to_sound" / "v1" / "common_pb2.pyi").exists()


def test_stubs_import_by_absolute_path_and_name_the_services():
    from image_to_sound.v1 import audio_pb2, audio_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, vision_pb2, vision_pb2_grpc

    assert vision_pb2.DESCRIPTOR.package == "image_to_sound.v1"
    names = {
        s.full_name: [m.name for m in s.methods]
        for module in (vision_pb2, audio_pb2, orchestrator_pb2)
        for s in module.DESCRIPTOR.services_by_name.values()
    }
    assert names == {
        "image_to_sound.v1.VisionService": ["DescribeScene", "StreamSceneDescription"],
        "image_to_sound.v1.AudioService": ["GenerateAudio", "GetAudioLimits"],
        "image_to_sound.v1.Orchestrator": ["ImageToSound", "StreamImagesToSound"],
    }
    assert vision_pb2_grpc.VisionServiceStub and audio_pb2_grpc.AudioServiceStub and orchestrator_pb2_grpc.OrchestratorStub


def test_every_message_field_and_rpc_is_commented():
    """Convention (docs/architecture.md "The contract"): a comment on every message, field, enum value and RPC."""
    for proto in (ROOT / "protos" / "image_to_sound" / "v1").glob("*.proto"):
        lines = proto.read_text().splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            declares = (
                stripped.startswith(("message ", "enum ", "service ", "rpc ", "oneof "))
                or (stripped.endswith(";") and "=" in stripped and not stripped.startswith(("syntax", "package", "import", "option")))
            )
            if declares:
                assert lines[i - 1].strip().startswith("//"), f"{proto.name}:{i + 1} has no comment: {stripped}"


def test_enums_start_with_unspecified_zero():
    from image_to_sound.v1 import common_pb2, orchestrator_pb2

    for module in (common_pb2, orchestrator_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
