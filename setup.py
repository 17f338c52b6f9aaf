"""Generates the gRPC stubs (protos/ -> *_pb2.py, *_pb2_grpc.py, *.pyi) and the orchestrator's Connect
stubs (*_connect.py, for the HTTP front in gateway/) whenever the package is built, so `pip install .`
works from a clean checkout; everything else is in pyproject.toml."""
import sys
import tempfile
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def generate_stubs() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p) for p in (ROOT / "protos").rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types
    out = str(ROOT / "protos")
    args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed on " + " ".join(protos))
    # The Connect plugin (protoc-gen-connectrpc, a pinned build requirement) runs as a launcher on this very
    # interpreter, so it is found wherever the module is importable (isolated builds, borrowed site-packages).
    orchestrator = str(ROOT / "protos" / "image_to_sound" / "v1" / "orchestrator.proto")
    with tempfile.TemporaryDirectory() as folder:
        plugin = Path(folder) / "protoc-gen-connectrpc"
        plugin.write_text(f"#!{sys.executable}\nimport sys\nfrom protoc_gen_connectrpc import main\nsys.exit(main())\n")
        plugin.chmod(0o755)
        if protoc.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--plugin=protoc-gen-connectrpc={plugin}",
                        f"--connectrpc_out={out}", "--connectrpc_opt=protobuf=google", orchestrator]) != 0:
            raise RuntimeError("protoc (Connect plugin) failed on " + orchestrator)


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
