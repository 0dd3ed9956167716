"""Builds the ggml quantized-matmul extension for the CPU path (`make` runs this once).

  python -m pallas_kernels.quantized_matmul.build [--force]

ggml (llama.cpp's tensor library) is taken from the pinned llama-cpp-python sdist on PyPI, which vendors
it (or from JAXLLM_GGML_SRC, a llama.cpp checkout). Only ggml's CPU backend is compiled, as
static libraries without OpenMP (the extension drives ggml's own thread pool), for the instruction sets
this host reports (-march=native is avoided: on one VM it built a binary that died with an illegal
instruction). ggml's AMX int8 kernels are built where the CPU reports all of AMX_FLAGS, and amx_bf16.cc's
bf16 GEMM for large steps (and the attention's bf16 tile path) where it reports AMX_BF16_FLAGS. The
result, ggml_ffi.cc, amx_bf16.cc, the CPU paged attention (ragged_paged_attention/cpu_ffi.cc) and the
sampler's row reductions (sampling/cpu_ffi.cc), which run on ggml's thread pool, linked against it, go
to the cache directory `library_path()` names, with ggml's public headers beside it (`headers_dir()`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

GGML_SDIST = "llama-cpp-python==0.3.36"
HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "ggml_ffi.cc", HERE / "amx_bf16.cc", HERE / "amx_int8.cc",
           HERE.parent / "ragged_paged_attention" / "cpu_ffi.cc", HERE.parent / "sampling" / "cpu_ffi.cc")
HEADERS = (HERE / "ggml_runtime.h", HERE / "amx_bf16.h", HERE / "amx_int8.h", HERE / "amx_tiles.h",
           HERE / "cpu_vectors.h")


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return root / "jaxllm" / "ggml"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


AMX_FLAGS = {"amx_tile", "amx_int8", "avx512_vnni", "avx512f"}
# amx_bf16.cc's bf16 tile GEMM for large steps (its weight conversion uses AVX512-BF16, BW and VBMI)
AMX_BF16_FLAGS = AMX_FLAGS | {"amx_bf16", "avx512_bf16", "avx512bw", "avx512vbmi"}


def ggml_options(flags: set[str]) -> list[str]:
    """cmake -D options enabling exactly the x86 extensions this CPU has."""
    want = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
            "GGML_BMI2": "bmi2", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
            "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16", "GGML_AVX_VNNI": "avx_vnni"}
    amx = "ON" if AMX_FLAGS <= flags else "OFF"
    return [f"-D{opt}={'ON' if flag in flags else 'OFF'}" for opt, flag in want.items()] + [
        f"-DGGML_AMX_TILE={amx}", f"-DGGML_AMX_INT8={amx}", "-DGGML_AMX_BF16=OFF"]


def isa_flags(flags: set[str]) -> list[str]:
    """Compiler flags for our own loops (the attention's head_dim loops vectorize with them)."""
    known = {"avx2": "-mavx2", "fma": "-mfma", "f16c": "-mf16c", "avx512f": "-mavx512f"}
    return [opt for flag, opt in known.items() if flag in flags]


def key() -> str:
    import jaxlib
    flags = ggml_options(cpu_flags()) + sorted(cpu_flags() & AMX_BF16_FLAGS)
    src = b"".join(p.read_bytes() for p in SOURCES + HEADERS + (Path(__file__),))
    digest = hashlib.sha256(repr((GGML_SDIST, jaxlib.__version__, flags)).encode() + src).hexdigest()[:16]
    return digest


def library_path() -> Path:
    return cache_dir() / key() / "libjaxllm_ggml.so"


def _ggml_source(work: Path) -> Path:
    """A writable copy of llama.cpp's sources (the AMX kernels get patched, see _patch_amx)."""
    src = os.environ.get("JAXLLM_GGML_SRC")
    if src:
        root = work / "llama.cpp"
        skip = lambda d, names: [n for n in names if Path(d) == Path(src) and n in ("build", ".git", "models")]
        shutil.copytree(src, root, ignore=skip)
    else:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", str(work), GGML_SDIST], check=True)
        archive = next(work.glob("*.tar.gz"))
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
            tar.extractall(work, members=members, filter="data")
        root = next(work.glob("*/vendor/llama.cpp"))
    return root


def _patch_amx(llama_cpp: Path) -> None:
    """Two fixes to ggml's tile configuration, each of which otherwise ends in SIGILL on a tile load:
    - GCC before 14 drops the stores that fill the configuration ahead of _tile_loadconfig (the builtin
      does not tell it that the struct is read), so ggml loads an empty one; an asm operand that reads
      the struct keeps the stores.
    - ggml loads it once per thread (a thread_local flag) and trusts it from then on, but the thread
      that calls the custom call is XLA's, and XLA:CPU's own AMX kernels (oneDNN / XNNPACK dots) release
      the tiles when they finish; so it is loaded on every call (one ldtilecfg per thread per matmul)."""
    mmq = llama_cpp / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    text = mmq.read_text()
    for old, new in (("_tile_loadconfig(&tc);", '__asm__ __volatile__("ldtilecfg %0" : : "m"(tc));'),
                     ("    if (done) {\n        return;\n    }\n",
                      "    (void)done;  // jaxllm: reload every call (build._patch_amx)\n")):
        if new in text:  # a checkout patched already
            continue
        if old not in text:
            raise RuntimeError(f"{mmq}: ggml's tile configuration code changed; re-check the AMX patch")
        text = text.replace(old, new)
    mmq.write_text(text)


def build(force: bool = False) -> Path:
    out = library_path()
    if out.exists() and not force:
        return out
    import jax.ffi
    if shutil.which("c++") is None:
        raise RuntimeError("building the ggml extension needs a C++ compiler ('c++' on PATH)")
    cmake = shutil.which("cmake") or shutil.which("cmake", path=str(Path(sys.executable).parent))
    if cmake is None:  # PyPI's cmake wheel, into this environment
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "cmake>=3.20"], check=True)
        cmake = shutil.which("cmake", path=str(Path(sys.executable).parent))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        llama_cpp = _ggml_source(work)
        _patch_amx(llama_cpp)
        ggml = llama_cpp / "ggml"
        build_dir = work / "build"
        # Configured through llama.cpp's top level (ggml alone wants its test tree), building ggml only.
        subprocess.run([cmake, "-S", str(llama_cpp), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=OFF",
                        "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF", "-DLLAMA_CURL=OFF",
                        "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_POSITION_INDEPENDENT_CODE=ON", "-DGGML_NATIVE=OFF",
                        "-DGGML_OPENMP=OFF", "-DGGML_BACKEND_DL=OFF", "-DGGML_CPU_REPACK=OFF",
                        "-DGGML_BUILD_TESTS=OFF", "-DGGML_BUILD_EXAMPLES=OFF", *ggml_options(cpu_flags())],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([cmake, "--build", str(build_dir), "--target", "ggml-cpu", "ggml-base",
                        "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
        libs = {p.name: p for p in build_dir.rglob("*.a")}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".tmp")
        subprocess.run(["c++", "-O3", "-std=c++17", "-shared", "-fPIC", "-w", "-fopenmp-simd",
                        *isa_flags(cpu_flags()), *(["-DJAXLLM_AMX"] if AMX_FLAGS <= cpu_flags() else []),
                        *(["-DJAXLLM_AMX_BF16"] if AMX_BF16_FLAGS <= cpu_flags() else []),
                        *map(str, SOURCES), "-I", str(HERE), "-I", str(ggml / "include"), "-I", str(ggml / "src"),
                        "-I", jax.ffi.include_dir(),
                        "-Wl,--whole-archive", str(libs["libggml-cpu.a"]), "-Wl,--no-whole-archive",
                        str(libs["libggml-base.a"]), "-lpthread", "-lm", "-o", str(tmp_out)], check=True)
        tmp_out.replace(out)
        # ggml's public headers stay beside the library: tests compile our sources against them for CPUs
        # this one is not (headers_dir)
        shutil.copytree(ggml / "include", headers_dir(), dirs_exist_ok=True)
    return out


def headers_dir() -> Path:
    """ggml's public headers of the built library (copied by build)."""
    return library_path().parent / "include"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--optional", action="store_true", help="report a failed build and exit 0")
    args = parser.parse_args()
    try:
        print(f"ggml extension: {build(args.force)}")
    except Exception as e:  # noqa: BLE001 - the XLA path still works without the extension
        if not args.optional:
            raise
        print(f"ggml extension not built ({e}); quantized matmuls on CPU will dequantize in XLA", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
