"""The GPU kit (issue 28): what a GPU session measures, in one command on the device machine lent at times (one
80 GB H100, no network, only the working tree and up to 64 MiB of carried files, its own Python and torch), within
8 minutes; and the wheels it lacks, prepared here beforehand.

    .venv/bin/python -m bench.gpu_kit prepare                       # here: .whl/, checked against the 64 MiB limit
    bash bench/gpu_bench.sh "$OUT"                                  # there: device call, carry [".whl"], timeout_s 600
    .venv/bin/python -m bench.gpu_kit run --dry_run --out /tmp/kit  # here, on the CPU: every part at tiny sizes

Parts, in this order, each in a fresh interpreter of its own (bench/harness.py: killed with its children at its
limit, none started past --budget_s), so that a failure or an out-of-memory loses that part alone:

- gpu_tests: `pytest -m gpu tests/test_gpu.py` (skipped where there is no CUDA device);
- base: a randomly initialised model with Qwen2.5-VL-3B's configuration (bench/real_size_base.sh's) and synthetic
  pages (bench/cases.py's), which the later parts share;
- stages_bench: bench/stages_bench.py on that base, the current defaults beside the paths the H200 measured on
  2026-11-26: pretraining (checkpointing by memory; every layer; batches collated on the main process) with MFU,
  the cached contrastive loss (the last mini-batch's graph kept; every mini-batch encoded twice) against the plain
  loss at 8 pairs (16 needed 89.7 GiB there), and encoding (batches by size in workers; as given);
- family_*: a few steps of stages.pretrain's training (bench/cases.py's pretrain_ours, `checkpointing: auto`) on a
  random model of each family at its real 3-4B configuration (REAL_SIZE), with the estimate behind the
  checkpointing choice against the measured peak (torch.cuda.max_memory_allocated);
- zero2_contrast, zero3_contrast: `torchrun -m stages.contrast` with recipes/deepspeed/zero2.json and zero3.json
  for two steps; the run record's figures.

Writes OUT/kit.json (every part's figures, device, date, versions), OUT/kit.md (one table), OUT/kit.log (every
part's output) and the stage bench's OUT/bench.json and OUT/bench.log. With --dry_run, everything runs on the CPU
at tiny sizes with the packages of requirements.lock that the GPU image lacks and the kit does not carry made
unimportable (GPU_IMAGE), as there.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from importlib import metadata
from pathlib import Path

from bench.harness import Case

REPO = Path(__file__).resolve().parents[1]
WHEELS = REPO / ".whl"
CARRY_LIMIT_BYTES = 64 * 2**20  # the working tree and the carried files, together
GPU_PYTHON = "3.12"  # the device's python3 (3.12.3, /opt/torch/.venv)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# The packages of requirements.lock the kit carries, at the lock's versions: those the GPU image lacks that the
# stages import, and three it has in a version that does not do
CARRIED = {
    "transformers": "the image has 5.17; the stages use 5.24's models and processors",
    "trl": "missing",
    "peft": "the image's version is not known; the lock's",
    "datasets": "missing",
    "dill": "missing (datasets)",
    "multiprocess": "missing (datasets)",
    "deepspeed": "missing; an sdist only, built here into a py3-none-any wheel (its ops compile when first used)",
    "hjson": "missing (deepspeed)",
    "pydantic": "missing (deepspeed)",
    "pydantic-core": "missing (pydantic)",
    "annotated-types": "missing (pydantic)",
    "typing-inspection": "missing (pydantic)",
    "typing-extensions": "pydantic 2.14 needs 4.16 or later; the image's version is not known",
    "langcodes": "missing (common/languages.py)",
    "jiwer": "missing (the pretraining stage's transcription CER)",
    "rapidfuzz": "missing (jiwer)",
}
# The Python packages of the device's image ('cuda'), as read on one of its machines on 2026-11-17; some versions
# seen there: python 3.12.3, torch 2.11.0, transformers 5.17.0, accelerate 1.15.0, tokenizers 0.23.2,
# huggingface_hub 1.33.0, safetensors 0.8.0, numpy 2.5.2
GPU_IMAGE = frozenset(
    """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
    charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
    cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
    flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
    huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
    jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax
    llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
    nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
    nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
    nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
    optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
    pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
    python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
    scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
    six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
    tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
    tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
    wheel wrapt xarray xxhash yarl zipp""".split()
)
# needed here by huggingface_hub 2.4 (the lock's); the image's 1.33 uses httpx, which it has: a dry run keeps them.
# platformdirs (mkdocs's, for `make docs`) registers a pytest plugin that pytest here loads from the venv's metadata
# even with the module blocked; the image has neither, so the stand-in leaves it importable
NEEDED_HERE_ONLY = frozenset({"httpx2", "httpcore2", "truststore", "platformdirs"})

# Each family's real configuration, as far as stages.base_model's flags say it: its attention is hidden_size wide
# (head_dim = hidden_size / heads), where Qwen3-VL-4B's is 4096 wide (32 heads of 128) and Gemma 3 4B's 2048 (8 of
# 256): here 20 heads of 128 and 10 of 256, the real head size. Gemma 3's tower reads 224-px squares here (64 tokens;
# 896 px and 256 tokens in the real one); the Omni thinker's audio encoder takes the vision tower's sizes. Built on
# the meta device here: 3.75B, 4.00B, 4.43B and 4.25B parameters (the real Qwen2.5-VL-3B has 3.75B).
QWEN2_5_3B = (
    "--hidden_size 2048 --num_hidden_layers 36 --num_attention_heads 16 --num_key_value_heads 2 "
    "--intermediate_size 11008 --embedding_rows 151936 --tie_word_embeddings true --vision_depth 32 "
    "--vision_hidden_size 1280 --vision_num_heads 16 --vision_intermediate_size 3420"
)
REAL_SIZE = {
    "qwen2_5_vl": QWEN2_5_3B,
    "qwen3_vl": "--hidden_size 2560 --num_hidden_layers 36 --num_attention_heads 20 --num_key_value_heads 4 "
    "--intermediate_size 9728 --embedding_rows 151936 --tie_word_embeddings true --vision_depth 24 "
    "--vision_hidden_size 1024 --vision_num_heads 16 --vision_intermediate_size 4096",
    "gemma3": "--hidden_size 2560 --num_hidden_layers 34 --num_attention_heads 10 --num_key_value_heads 5 "
    "--intermediate_size 10240 --embedding_rows 262208 --tie_word_embeddings true --vision_depth 27 "
    "--vision_hidden_size 1152 --vision_num_heads 16 --vision_intermediate_size 4304",
    "qwen2_5_omni": QWEN2_5_3B,
}
FAMILIES = tuple(REAL_SIZE)
# What the parts measure: on the GPU, recipes/th.yaml at the real sizes; in a dry run, the tiny recipe and models
SCALES = {
    "gpu": {
        "recipe": "recipes/th.yaml",
        "base_flags": ["--dtype", "bfloat16", "--max_pixels", "1003520"],
        "real_size": True,
        "pages": 64,
        "text_tokens": [300, 1500],
        "queries": 16,
        "pretrain_batch": 2,
        "warmup_steps": 1,
        "timed_steps": 2,
        "flop_examples": 1,
        "contrast_batch": 16,
        "mini_batch": 8,
    },
    "dry_run": {
        "recipe": "recipes/tiny.yaml",
        "base_flags": [],
        "real_size": False,
        "pages": 24,
        "text_tokens": [40, 200],
        "queries": 8,
        "pretrain_batch": 2,
        "warmup_steps": 1,
        "timed_steps": 1,
        "flop_examples": 1,
        "contrast_batch": 8,
        "mini_batch": 4,
    },
}
# the stage bench's cases, most wanted first (its own budget cuts the last); contrast_stage (1024 pairs, ~2 minutes)
# and contrast_accum (91 GiB on the H200) are left out
BENCH_CASES = (
    "matmul_peak",
    "pretrain_ours",
    "pretrain_ours_ckpt_all",
    "contrast_plain",
    "contrast_cached",
    "contrast_cached_reencode_all",
    "pretrain_ours_collate_main",
    "evaluate_sorted_workers",
    "evaluate",
)
PLAIN_BATCH_80GB = 8  # contrast_plain at 16 pairs peaked at 89.7 GiB on the H200 (2026-11-26)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_versions() -> dict[str, str]:
    """{normalised name: version} of requirements.lock."""
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        name, _, version = line.partition("==")
        if version and not line.lstrip().startswith("#"):
            pins[normalise(name)] = version.strip()
    return pins


def blocked_modules() -> list[str]:
    """The top-level modules of the lock's packages that neither the GPU image nor the kit brings."""
    absent = set(lock_versions()) - GPU_IMAGE - {normalise(name) for name in CARRIED} - NEEDED_HERE_ONLY
    modules = [
        module
        for module, distributions in metadata.packages_distributions().items()
        if any(normalise(d) in absent for d in distributions)
    ]
    return sorted(m for m in modules if m.isidentifier())


def write_gpu_image(folder: Path) -> Path:
    """A sitecustomize that makes blocked_modules() unimportable in every Python process started with `folder` on
    PYTHONPATH (None in sys.modules: `import` raises ModuleNotFoundError, importlib.util.find_spec returns None, as
    for a package not installed)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\n\n# bench/gpu_kit.py: packages the GPU image lacks and the kit does not carry\n"
        f"for name in {blocked_modules()!r}:\n    sys.modules.setdefault(name, None)\n"
    )
    return folder


# ---- prepare (here) ----


def pip(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"pip {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def wheel_of(name: str, version: str, folder: Path) -> Path | None:
    for path in folder.glob("*.whl"):
        wheel_name, wheel_version = path.name.split("-")[:2]
        if normalise(wheel_name) == normalise(name) and wheel_version == version:
            return path
    return None


def build_deepspeed(version: str) -> Path:
    """DeepSpeed publishes an sdist only: built here into a pure-Python wheel, its ops left to compile when first
    used (DS_BUILD_OPS=0), against this environment's torch (no build isolation: it imports torch to build)."""
    with tempfile.TemporaryDirectory() as tmp:
        pip("download", "--no-deps", "--no-binary=:all:", "-d", tmp, f"deepspeed=={version}")
        (sdist,) = Path(tmp).glob("deepspeed-*.tar.gz")
        environment = {**os.environ, "DS_BUILD_OPS": "0"}
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", tmp, str(sdist)],
            capture_output=True,
            text=True,
            env=environment,
        )
        if done.returncode:
            sys.exit(f"building the deepspeed wheel failed:\n{done.stdout}{done.stderr}")
        (wheel,) = Path(tmp).glob("deepspeed-*.whl")
        return Path(shutil.copy(wheel, WHEELS))


def tree_bytes() -> int:
    """Bytes of what a device call sends besides the carried paths: tracked files, and untracked ones git does not
    ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    files = (REPO / name for name in listed.split("\0") if name)
    return sum(path.stat().st_size for path in files if path.is_file() and not path.is_symlink())


def prepare(args: argparse.Namespace) -> None:
    pins = lock_versions()
    WHEELS.mkdir(exist_ok=True)
    platforms = [item for platform in PLATFORMS for item in ("--platform", platform)]
    wanted = []
    for name in CARRIED:
        version = pins[normalise(name)]
        wheel = wheel_of(name, version, WHEELS)
        if wheel is None and name == "deepspeed":
            wheel = build_deepspeed(version)
        elif wheel is None:
            pip(
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                GPU_PYTHON,
                "--implementation",
                "cp",
                *platforms,
                "-d",
                str(WHEELS),
                f"{name}=={version}",
            )
            wheel = wheel_of(name, version, WHEELS)
        if wheel is None:
            sys.exit(f"pip saved no wheel of {name}=={version} in {WHEELS}")
        wanted.append(wheel)
    for path in WHEELS.iterdir():
        if path not in wanted:  # another version: two of one package stop the install there
            path.unlink()
    wheels = sum(path.stat().st_size for path in wanted)
    tree = tree_bytes()
    for path in sorted(wanted, key=lambda p: -p.stat().st_size):
        print(f"{path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    total = wheels + tree
    print(
        f"{len(wanted)} wheels {wheels / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
        f"{total / 2**20:.1f} MiB of the {CARRY_LIMIT_BYTES // 2**20} MiB a device call carries"
    )
    if total > CARRY_LIMIT_BYTES:
        sys.exit("too large for a device call: leave a wheel out (CARRIED in bench/gpu_kit.py) or shrink the tree")
    print('device call: bash bench/gpu_bench.sh "$OUT"   carry [".whl"], timeout_s 600')


# ---- the parts (each run in a fresh interpreter by bench/harness.py) ----


def run_logged(command: list[str], seconds: float, environment: dict | None = None) -> int:
    """Run `command`, its output into this part's (the kit's log), for at most `seconds`."""
    sys.stdout.flush()
    try:
        return subprocess.run(command, cwd=REPO, timeout=max(seconds, 1), env=environment).returncode
    except subprocess.TimeoutExpired:
        return -1


def seconds_left(ctx: dict) -> float:
    """The time of this part (ctx["case"]): its limit, within the kit's deadline, less a margin to report in."""
    limit = CASES[ctx["case"]].limit_s * ctx["limit_factor"]
    return min(limit, ctx["deadline_unix"] - time.time()) - 10


TEST_OUTCOMES = ("passed", "failed", "errors", "skipped")


def gpu_tests(ctx: dict) -> dict:
    report = Path(ctx["work"]) / "gpu_tests.xml"
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider"]
    code = run_logged([*command, f"--junitxml={report}"], seconds_left(ctx))
    if not report.is_file():
        raise RuntimeError(f"pytest exited {code} before writing its report")
    suite = ElementTree.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    outcomes = {}
    for test in suite.iter("testcase"):
        tag = next((child.tag for child in test if child.tag in ("failure", "error", "skipped")), "passed")
        outcomes[test.get("name")] = {"failure": "failed", "error": "errors"}.get(tag, tag)
    counts = {kind: sum(1 for o in outcomes.values() if o == kind) for kind in TEST_OUTCOMES}
    failed = sorted(name for name, outcome in outcomes.items() if outcome in ("failed", "errors"))
    return {"exit_code": code, **counts, "tests": outcomes, **({"failures": failed} if failed else {})}


def build_base(ctx: dict, family: str, folder: str) -> int:
    """A random model of `family` at the scale's size in `folder`; its parameter count."""
    from bench.cases import build_base_model

    scale = ctx["scale"]
    flags = [*scale["base_flags"], "--family", family]
    if scale["real_size"]:
        flags += REAL_SIZE[family].split()
    figures = build_base_model({**ctx, "base": folder, "scale": {**scale, "base_flags": flags}})
    return figures["parameters"]


def base(ctx: dict) -> dict:
    from bench.cases import write_pages

    parameters = build_base(ctx, "qwen2_5_vl", ctx["base"])
    return {"parameters": parameters, **write_pages(ctx)}


def needs_base(ctx: dict) -> None:
    if "error" in ctx["earlier"].get("base", {"error": "not run"}):
        raise RuntimeError("the base part did not run or failed: this part measures its model")


def stages_bench(ctx: dict) -> dict:
    needs_base(ctx)
    out = Path(ctx["out"]) / "bench.json"
    budget = seconds_left(ctx) - 15  # its imports and report
    command = [sys.executable, "bench/stages_bench.py", "--out", str(out), "--base", ctx["base"]]
    command += ["--budget_s", str(round(budget)), "--cases", *BENCH_CASES]
    command += ["--tiny"] if ctx["dry_run"] else ["--plain_batches", str(PLAIN_BATCH_80GB)]
    code = run_logged(command, budget + 15)
    if not out.is_file():
        raise RuntimeError(f"bench/stages_bench.py exited {code} before writing {out.name}")
    report = json.loads(out.read_text())
    return {"exit_code": code, "cases": report["cases"], "ratios": report["ratios"]}


def family_steps(ctx: dict, family: str) -> dict:
    """A few training steps of stages.pretrain (bench/cases.py's pretrain_ours: the stage's own functions, no
    final/ written) on a random `family` model, `checkpointing: auto`, and its estimate against the measured peak."""
    import torch

    from bench.cases import pretrain_ours

    needs_base(ctx)
    folder = ctx["base"] if family == "qwen2_5_vl" else str(Path(ctx["work"]) / f"base-{family}")
    parameters = ctx["earlier"]["base"]["parameters"] if family == "qwen2_5_vl" else build_base(ctx, family, folder)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # the peak of the steps, not of building the model
    figures = pretrain_ours({**ctx, "base": folder})
    if folder != ctx["base"]:
        shutil.rmtree(folder, ignore_errors=True)  # 7-9 GB each at the real sizes
    checkpointing = figures.get("checkpointing", {})
    measured = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    estimate = checkpointing.get("estimated_peak_gib")
    return {
        "family": family,
        "parameters": parameters,
        **{key: value for key, value in figures.items() if key not in ("loss_curve", "flags")},
        "losses": figures.get("loss_curve"),
        "estimated_peak_gib": estimate,
        "measured_peak_gib": round(measured, 2) if measured is not None else None,
        "estimate_over_measured": round(estimate / measured, 3) if estimate and measured else None,
    }


def zero_contrast(ctx: dict, stage: int) -> dict:
    """`torchrun --nproc_per_node 1 -m stages.contrast --deepspeed recipes/deepspeed/zero{stage}.json`, two steps
    of the recipe's LoRA on the base model; the run record's figures."""
    needs_base(ctx)
    scale, output = ctx["scale"], Path(ctx["work"]) / f"zero{stage}_contrast"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "stages.contrast"]
    command += ["--config", ctx["recipe"], "--model_name_or_path", ctx["base"], "--pages_datasets", *ctx["pages"]]
    command += ["--output_dir", str(output), "--deepspeed", f"recipes/deepspeed/zero{stage}.json", "--max_steps", "2"]
    command += ["--contrastive_batch_size", str(scale["contrast_batch"]), "--mini_batch_size", str(scale["mini_batch"])]
    # each step all text or all images, which ZeRO-3 needs; no held-out pairs or evaluation: the steps alone
    command += ["--homogeneous_batches", "true", "--eval_fraction", "0.0", "--eval_steps", "0", "--logging_steps", "1"]
    started = time.monotonic()
    code = run_logged(command, seconds_left(ctx))
    record = output / "final" / "run_record.json"
    if code or not record.is_file():
        raise RuntimeError(f"stages.contrast under ZeRO-{stage} exited {code}; its output is above in kit.log")
    results = json.loads(record.read_text())["results"]
    shutil.rmtree(output, ignore_errors=True)
    kept = ("steps", "wall_time_s", "pairs_per_second", "peak_gpu_memory_gib", "loss_history")
    return {
        "zero_stage": stage,
        "command_wall_s": round(time.monotonic() - started, 1),
        **{key: value for key, value in results.items() if key in kept or "engine" in key or "precision" in key},
    }


def family_case(family: str) -> Case:
    return Case(lambda ctx: family_steps(ctx, family), 120)


def zero_case(stage: int) -> Case:
    return Case(lambda ctx: zero_contrast(ctx, stage), 120)


CASES = {
    "gpu_tests": Case(gpu_tests, 120),
    "base": Case(base, 120),
    "stages_bench": Case(stages_bench, 200),
    **{f"family_{family}": family_case(family) for family in FAMILIES},
    "zero2_contrast": zero_case(2),
    "zero3_contrast": zero_case(3),
}
NEEDS_BASE = tuple(name for name in CASES if name not in ("gpu_tests", "base"))


# ---- the report ----


def versions() -> dict:
    """The Python packages the parts import, as installed, and those that differ from requirements.lock."""
    import platform

    installed = {}
    for name in lock_versions():
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    pins = lock_versions()
    main = ("torch", "torchvision", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "tokenizers")
    return {
        "python": platform.python_version(),
        **{name: installed.get(name) for name in main},
        "differ_from_lock": {
            name: {"lock": pins[name], "installed": version}
            for name, version in installed.items()
            if version != pins[name] and version is not None
        },
    }


def device() -> dict:
    query = "name,memory.total,driver_version"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        line = ""
    if not line:
        import platform

        return {"name": f"cpu ({platform.machine()}, {os.cpu_count()} cores)", "gpu": False}
    name, memory, driver = [part.strip() for part in line.splitlines()[0].split(",")]
    return {"name": name, "memory": memory, "driver": driver, "gpu": True}


def fmt(value, unit: str = "", digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def mfu(figures: dict, peak_tflops: float | None) -> float | None:
    rate, flops = figures.get("tokens_per_second"), figures.get("flops_per_token")
    return rate * flops / 1e12 / peak_tflops if rate and flops and peak_tflops else None


def layers(every_n: int | None) -> str:
    return {None: "?", 0: "off", 1: "every layer"}.get(every_n, f"every {every_n} layers")


def pretrain_cell(figures: dict, peak_tflops: float | None) -> str:
    checkpointing = figures.get("checkpointing") or {}
    cells = [
        fmt(figures.get("tokens_per_second"), " tokens/s", 1),
        f"MFU {100 * mfu(figures, peak_tflops):.1f}%" if mfu(figures, peak_tflops) else "",
        f"peak {fmt(figures.get('peak_gpu_memory_gib'))} GiB" if figures.get("peak_gpu_memory_gib") else "",
        f"checkpointing {checkpointing.get('setting')}: {layers(checkpointing.get('every_n_layers'))}"
        if checkpointing
        else "",
        f"estimate {checkpointing['estimated_peak_gib']} GiB" if checkpointing.get("estimated_peak_gib") else "",
    ]
    return "; ".join(cell for cell in cells if cell)


def rows(report: dict) -> list[tuple[str, str, str, str]]:
    """(part, status, figures, seconds) for the table: a row per part, per stage-bench case and per ratio."""
    table = []
    bench = report["parts"].get("stages_bench", {})
    peak = bench.get("cases", {}).get("matmul_peak", {}).get("tflops_per_second")
    for name, figures in report["parts"].items():
        seconds = fmt(figures.get("case_wall_s"), "", 1)
        if "error" in figures:
            table.append((name, "error", f"{figures['error']}: {' / '.join(figures.get('log_tail', [])[-2:])}", ""))
            continue
        status = "failed" if figures.get("failures") else "ok"
        if name == "gpu_tests":
            counts = ", ".join(f"{figures[k]} {k}" for k in TEST_OUTCOMES if figures[k])
            detail = counts + (f" ({', '.join(figures['failures'])})" if figures.get("failures") else "")
        elif name == "base":
            detail = f"{figures['parameters']:,} parameters; {figures['pages']} pages of {figures['text_tokens_mean']}"
            detail += " text tokens on average"
        elif name == "stages_bench":
            detail = f"{len(figures['cases'])} cases, below"
        elif name.startswith("family_"):
            detail = f"{figures['parameters']:,} parameters; " + pretrain_cell(figures, peak)
            if figures.get("measured_peak_gib") is not None:
                detail += f"; measured peak {figures['measured_peak_gib']} GiB"
                detail += f", estimate / measured {fmt(figures.get('estimate_over_measured'), '', 3)}"
        elif name.startswith("zero"):
            losses = [round(entry["loss"], 3) for entry in figures.get("loss_history", [])]
            from lco.engine import describe_engine

            engine = figures.get("engine", {})
            detail = f"{figures.get('steps')} steps; {fmt(figures.get('pairs_per_second'))} pairs/s; "
            if figures.get("peak_gpu_memory_gib"):
                detail += f"peak {fmt(figures['peak_gpu_memory_gib'])} GiB; "
            detail += f"losses {losses}; " + (describe_engine(engine) if engine else "engine not recorded")
        else:
            detail = json.dumps(figures)[:200]
        table.append((name, status, detail, seconds))
        if name == "stages_bench":
            for case, case_figures in figures["cases"].items():
                table.append(bench_row(case, case_figures, peak))
            for key, value in {**figures["ratios"], **default_over_older(figures["cases"])}.items():
                table.append((f"stages_bench ratio {key}", "", str(value), ""))
    return table


def bench_row(case: str, figures: dict, peak: float | None) -> tuple[str, str, str, str]:
    name = f"stages_bench/{case}"
    if "error" in figures:
        return (name, "error", f"{figures['error']}: {' / '.join(figures.get('log_tail', [])[-2:])}", "")
    if case.startswith("pretrain_"):
        detail = pretrain_cell(figures, peak)
    else:
        rates = ("pairs_per_second", "pages_per_second", "queries_per_second", "tflops_per_second")
        detail = "; ".join(f"{figures[k]} {k.removesuffix('_per_second')}/s" for k in rates if k in figures)
        detail += "".join(f"; {k} {figures[k]}" for k in ("batch", "mini_batch") if k in figures)
        if figures.get("peak_gpu_memory_gib"):
            detail += f"; peak {figures['peak_gpu_memory_gib']} GiB"
    return (name, "ok", detail, fmt(figures.get("case_wall_s"), "", 1))


def default_over_older(cases: dict) -> dict:
    """The stage's current defaults over the paths the H200 measured on 2026-11-26, tokens/s."""

    def rate(case):
        return cases.get(case, {}).get("tokens_per_second")

    found = {}
    for older in ("pretrain_ours_ckpt_all", "pretrain_ours_collate_main"):
        if rate("pretrain_ours") and rate(older):
            found[f"pretrain_ours_over_{older.removeprefix('pretrain_ours_')}_tokens_per_s"] = round(
                rate("pretrain_ours") / rate(older), 3
            )
    return found


def markdown(report: dict) -> str:
    head = [
        f"# GPU kit, {report['created']}",
        "",
        f"Device: {report['device']['name']}"
        + (f", {report['device']['memory']}, driver {report['device']['driver']}" if report["device"]["gpu"] else "")
        + (" (dry run: the CPU, tiny sizes)" if report["dry_run"] else ""),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if k != "differ_from_lock"),
        "Differ from requirements.lock: "
        + (
            ", ".join(f"{k} {v['lock']} -> {v['installed']}" for k, v in report["versions"]["differ_from_lock"].items())
            or "none"
        ),
        f"{report['wall_time_s']} s of a {report['budget_s']} s budget; kit.json: the figures; kit.log: the output.",
        "",
        "| part | status | figures | s |",
        "|---|---|---|---|",
    ]
    cells = [" | ".join(cell.replace("|", "/") for cell in row) for row in rows(report)]
    return "\n".join(head + [f"| {line} |" for line in cells]) + "\n"


def run(args: argparse.Namespace) -> None:
    from bench.cases import write_recipe
    from bench.harness import run_cases
    from bench.report import write_report

    started, started_unix = time.monotonic(), time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "kit.log"
    log.write_text("")
    os.chdir(REPO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ["PYTHONUNBUFFERED"] = "1"
    budget = args.budget_s or (3600.0 if args.dry_run else 420.0)
    work = Path(tempfile.mkdtemp(prefix="gpu-kit-"))
    if args.dry_run:
        # the parts' interpreters see the packages the GPU image has and the kit carries, as there
        gpu_image = write_gpu_image(work / "gpu_image")
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(gpu_image), str(REPO), os.environ.get("PYTHONPATH")])
        )
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models on a small shared CPU: threads only wait
    scale = SCALES["dry_run" if args.dry_run else "gpu"]
    context = {
        "dry_run": args.dry_run,
        "scale": scale,
        "work": str(work),
        "out": str(out),
        "recipe": write_recipe(scale["recipe"], work),
        "base": str(work / "base"),
        "pages": [str(work / "pages-0")],
        "queries": str(work / "queries.json"),
        "deadline_unix": started_unix + budget,
        "limit_factor": 5 if args.dry_run else 1,  # a small CPU takes longer than the GPU's limits
    }
    chosen = list(dict.fromkeys(args.parts))
    if any(name in NEEDS_BASE for name in chosen) and "base" not in chosen:
        chosen.insert(0, "base")
    chosen.sort(key=list(CASES).index)
    report = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": args.dry_run,
        "command": " ".join(sys.argv),
        "device": device(),
        "versions": versions(),
        "budget_s": budget,
        "scale": scale,
        "parts": {},
    }

    def save() -> None:
        report["wall_time_s"] = round(time.monotonic() - started, 1)
        write_report(report, out / "kit.json")
        (out / "kit.md").write_text(markdown(report), encoding="utf-8")

    try:
        save()
        deadline = started + budget
        parts = run_cases(
            "bench.gpu_kit", chosen, context, work, log, deadline, fork=False, limit_factor=context["limit_factor"]
        )
        for name, figures in parts:
            report["parts"][name] = figures
            save()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "kit.md").read_text())
    print(f"wrote {out / 'kit.json'}, kit.md and kit.log in {report['wall_time_s']}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="Download and build into .whl/ the wheels the GPU image lacks.")
    runner = commands.add_parser("run", help="Run the parts; on the device, through bench/gpu_bench.sh.")
    runner.add_argument("--out", required=True, help="Folder for kit.json, kit.md, kit.log and bench.json/.log.")
    runner.add_argument("--dry_run", action="store_true", help="The CPU, tiny sizes, the GPU image's packages.")
    runner.add_argument(
        "--budget_s", type=float, default=None, help="Start no part past this many seconds (420; dry run 3600)."
    )
    runner.add_argument("--parts", nargs="+", choices=list(CASES), default=list(CASES), help="Parts to run.")
    args = parser.parse_args(argv)
    prepare(args) if args.command == "prepare" else run(args)


if __name__ == "__main__":
    main()
