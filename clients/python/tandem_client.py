"""Tandem from Python: generated gRPC stubs and a few helpers.

Any language with gRPC can use Tandem: its APIs are the .proto files under
proto/. This module compiles them with grpcio-tools on the first call of
stubs() (into a temporary folder, removed when the process exits), so there
is nothing to check in or keep in sync.

    from tandem_client import channel, stubs
    pb = stubs()
    orders = pb.shop_grpc.OrdersStub(channel("127.0.0.1:7420"))
    sidecar = pb.sidecar_grpc.SidecarStub(channel("unix:/run/tandem/sidecar.sock"))
"""

import atexit
import importlib
import os
import shutil
import sys
import tempfile
import types

PROTO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "proto")
PROTOS = {
    "coordinator": "tandem/coordinator/v1/coordinator.proto",
    "sidecar": "tandem/sidecar/v1/sidecar.proto",
    "app": "tandem/app/v1/app.proto",
    "shop": "tandem/examples/v1/shop.proto",
}

_stubs = None
# Where the modules were generated (removed at exit, once imported).
_generated = None


def channel(target, options=()):
    """A plaintext gRPC channel to a sidecar (or a local coordinator):
    "HOST:PORT", or "unix:/path/to/socket".

    For a Unix socket grpcio sends the socket's path, percent-encoded, as
    the HTTP/2 :authority, which the sidecar's HTTP/2 server refuses (the
    call fails with RST_STREAM): the authority is set to "localhost".
    """
    import grpc

    options = list(options)
    if target.startswith("unix:"):
        options.append(("grpc.default_authority", "localhost"))
    return grpc.insecure_channel(target, options=options)


def stubs():
    """Generates (once) and imports the message and service modules.

    Returns a namespace with `coordinator`, `sidecar`, `app` and `shop`
    (messages) and `<name>_grpc` (services) for each.
    """
    global _stubs, _generated
    if _stubs is not None:
        return _stubs
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="tandem-py-")
    # Imported modules are not read again: the folder goes when the
    # process exits (normally; a killed process leaves it).
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    _generated = out
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + list(PROTOS.values())) != 0:
        raise RuntimeError("protoc failed on " + PROTO_ROOT)
    sys.path.insert(0, out)
    ns = types.SimpleNamespace()
    for name, path in PROTOS.items():
        module = path[: -len(".proto")].replace("/", ".")
        setattr(ns, name, importlib.import_module(module + "_pb2"))
        setattr(ns, name + "_grpc", importlib.import_module(module + "_pb2_grpc"))
    _stubs = ns
    return ns
