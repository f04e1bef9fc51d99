"""The engine's modules import one way: each only the ones before it in ORDER."""
import ast
import pathlib
import subprocess
import sys

import engine

ENGINE = pathlib.Path(engine.__file__).parent

# ir -> lower -> replay -> verify -> simulate -> render -> executor -> distribute, with the
# modules beside that chain placed after what they use.
ORDER = ["ir", "schedules", "user_schedules", "lower", "replay", "verify", "simulate", "render",
         "costs", "profiling", "candidates", "retime", "choose", "trace", "layers", "reports",
         "per_token", "tp_plan", "per_token_loss", "per_token_call",
         "tp_layers", "torch_loss", "torch_stage", "tp_comm", "tp_rng", "tp_checks",
         "tp_axes", "tp_loss", "tp_watched_loss", "tp_record", "tp_watch", "tp_forward",
         "tp_shard", "tp_state",
         "tensor_parallel", "tied", "tp_sums", "clip", "buffers", "zero_grads", "grad_wire",
         "zero_prefetch",
         "zero_layers", "zero_params",
         "traced_returned", "traced_pieces", "traced_inplace", "traced_cuts", "traced_modes",
         "traced_sizes", "traced_leaves", "traced_sequential", "traced_reshaped",
         "traced", "stagebuild", "stagebuild_ties", "partition_cuts", "partition",
         "pipeline_args", "scaled", "step", "rollback", "executor", "ulysses", "sp_axis",
         "agree", "calibrate", "given", "layer_timing", "measured_choice", "stage_state",
         "job_retime", "job_state", "job_optim", "job",
         "distribute_schedules", "distribute_measure", "distribute", "zero_args", "zero",
         "moe_gate", "moe_dispatch", "moe", "moe_zero", "moe_checkpoint", "ds_config", "ds_compat",
         "ds_checkpoint", "ds_partition", "ds_pipe", "ds_zero", "deepspeed", "show", "bench_torch",
         "bench_distribute", "bench_memory", "bench", "bench_zero", "bench_moe"]

# The users' short forms on Schedule (sched.validate() ...): each imports its
# pass when called; no pass calls them.
LAZY = {("ir", "Schedule.lower", "lower"), ("ir", "Schedule.validate", "verify"),
        ("ir", "Schedule.simulate", "simulate"), ("ir", "Schedule.render", "render")}

# A step's type hints name the Pipeline it belongs to (under TYPE_CHECKING), as ir's
# name simulate's SimReport.
TYPE_ONLY = {("step", "executor")}


def _targets(node: ast.AST) -> list[str]:
    """The engine modules an import statement names (relative or ``engine.x``)."""
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("engine.")]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level == 0 and base != "engine" and not base.startswith("engine."):
        return []
    if node.level == 0:
        base = base.partition(".")[2]
    if base:
        return [base.partition(".")[0]]
    return [a.name for a in node.names]


def _imports(name: str) -> list[tuple[str, str]]:
    """(engine module imported, where: "module", "TYPE_CHECKING" or Class.func)."""
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, where: str) -> None:
        for child in ast.iter_child_nodes(node):
            here = where
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                here = child.name if where == "module" else f"{where}.{child.name}"
            if isinstance(child, ast.If) and ast.unparse(child.test) == "TYPE_CHECKING":
                here = "TYPE_CHECKING"
            found.extend((mod, here) for mod in _targets(child))
            visit(child, here)

    visit(ast.parse((ENGINE / f"{name}.py").read_text()), "module")
    return found


def test_order_names_every_engine_module():
    assert sorted(ORDER) == sorted(p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__")


def test_no_module_imports_a_later_one():
    for i, name in enumerate(ORDER):
        for mod, where in _imports(name):
            assert mod in ORDER, f"engine.{name} imports unknown engine.{mod}"
            if ORDER.index(mod) < i:
                continue
            allowed = (name, where, mod) in LAZY or where == "TYPE_CHECKING" and (
                name == "ir" or (name, mod) in TYPE_ONLY)
            assert allowed, f"engine.{name} imports engine.{mod} ({where}), which comes after it"


def test_modules_import_in_order_in_a_fresh_interpreter():
    """Load each module alone (without engine/__init__, which loads them all)
    and check that nothing later came with it; str() of a schedule needs ir alone."""
    code = f"""
import importlib, sys, types
pkg = types.ModuleType("engine")
pkg.__path__ = [{str(ENGINE)!r}]
sys.modules["engine"] = pkg
order = {ORDER!r}
for i, name in enumerate(order):
    importlib.import_module("engine." + name)
    later = [m for m in order[i + 1:] if "engine." + m in sys.modules]
    assert not later, f"importing engine.{{name}} loaded {{later}}"
    if name == "ir":
        from engine.ir import Schedule
        text = str(Schedule.build([["0B0", "0F0"]], 1, [0]))
        assert "rank 0 | 0B0 0F0" in text, text
        loaded = [m for m in order[1:] if "engine." + m in sys.modules]
        assert not loaded, f"str(schedule) loaded {{loaded}}"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
