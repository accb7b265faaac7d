"""The package's layering, the one list of it (`LAYERS`) and its check: a module imports only from its own layer or
the layers below, and no modules import each other in a circle. Lazy imports inside functions count (they are
dependencies all the same); the code under `if __name__ == "__main__":` and `__main__` modules are entry points,
which stand on top of everything."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ctelm_jax"

# Lowest first. A module's layer is that of its first name under ctelm_jax (`run.build` -> `run`).
LAYERS = (
    ("errors", "fs", "console"),  # foundations: user errors, the one path type, what programs show
    ("parallel",),  # meshes, logical axis rules, processes
    ("models",),  # the ELM's modules, pure math on parameters
    ("weights",),  # weight formats and tokenizers, to and from the models
    ("encoders",),  # the frozen sentence encoder
    ("data", "concepts", "vectors"),  # records -> text -> embeddings -> examples -> batches; vector operations
    ("generate", "prompts", "rerank", "revise", "text_embedding"),  # decoding, shared by decode, eval and explore
    ("run",),  # what a workdir holds (config, splits, concept vectors, checkpoints, trained model, exports); the
    #            composition root that builds an ELM from a config
    ("train", "eval", "decode", "export", "hf"),  # what writes or reads a run
    ("sizing", "explore"),  # tools over training (memory, FLOPs) and over decode + eval (the explorer)
    ("aot", "embed", "evaluate", "main"),  # entry points and the TPU compiler over sizing
)


def layer_of(module: str) -> int:
    """The index in LAYERS of a module named relative to ctelm_jax ('' is the package itself: the bottom)."""
    head = module.split(".")[0]
    if not head:
        return 0
    for i, names in enumerate(LAYERS):
        if head in names:
            return i
    raise AssertionError(f"ctelm_jax.{module} is in no layer: add {head!r} to tests/test_layers.py's LAYERS.")


def package_sources() -> dict[str, str]:
    """Every module of the package, named relative to ctelm_jax ('' for its __init__), with its source."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return out


def _is_main_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and \
        test.left.id == "__name__"


def imports(module: str, source: str, modules: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere outside its `if __name__ == "__main__":` block."""
    found: set[str] = set()
    is_package = module == "" or module + "." in {m[: len(module) + 1] for m in modules if m}
    stack: list[ast.AST] = [ast.parse(source)]
    while stack:
        node = stack.pop()
        if _is_main_block(node):
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1] if node.level > 1 else anchor
                base = ".".join(["ctelm_jax", *filter(None, anchor), *filter(None, [base])])
            names = [f"{base}.{a.name}" for a in node.names]  # a module, or a name in the module `base`
        else:
            continue
        for name in names:
            if name == "ctelm_jax" or not name.startswith("ctelm_jax."):
                continue
            target = name[len("ctelm_jax."):]
            while target and target not in modules:
                target = target.rpartition(".")[0]
            # A module is not counted as importing its own package (the package's __init__ runs first anyway).
            if target and target != module and not module.startswith(target + "."):
                found.add(target)
    return found


def is_entry_point(module: str) -> bool:
    """`__main__` modules: what `python -m ctelm_jax.<package>` runs."""
    return module.split(".")[-1] == "__main__"


def violations(sources: dict[str, str]) -> list[str]:
    """Every upward import (a lower layer importing a higher one) and every import cycle, one line each."""
    modules = set(sources)
    for module in modules:
        layer_of(module)
    graph = {m: imports(m, s, modules) for m, s in sources.items()}
    out = [f"ctelm_jax.{m} (layer {layer_of(m)}: {LAYERS[layer_of(m)]}) imports ctelm_jax.{t} "
           f"(layer {layer_of(t)}: {LAYERS[layer_of(t)]})"
           for m, targets in sorted(graph.items()) if not is_entry_point(m)
           for t in sorted(targets) if layer_of(t) > layer_of(m)]
    # Cycles: strongly connected components of more than one module (Tarjan).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append("import cycle: " + " -> ".join(f"ctelm_jax.{c}" for c in sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer_and_imports_run_downward_without_cycles():
    assert violations(package_sources()) == []


def test_an_upward_import_is_caught():
    sources = package_sources()
    sources["models.llama"] += "\n\ndef _f():\n    from ctelm_jax.train import loop  # lazy, and still upward\n"
    assert ("ctelm_jax.models.llama (layer 2: ('models',)) imports ctelm_jax.train.loop (layer 8: "
            "('train', 'eval', 'decode', 'export', 'hf'))") in violations(sources)  # (a cycle too: loop imports llama)


def test_a_cycle_within_a_layer_is_caught():
    sources = package_sources()
    sources["data.render"] += "\nfrom ctelm_jax.data import tasks\n"  # data.tasks imports data.render
    assert violations(sources) == ["import cycle: ctelm_jax.data.render -> ctelm_jax.data.tasks"]


def test_entry_points_are_excepted():
    sources = package_sources()
    sources["models.llama"] += "\nif __name__ == '__main__':\n    from ctelm_jax import main\n"
    sources["models.__main__"] = "from ctelm_jax.train import loop\n"
    assert violations(sources) == []


def test_a_module_outside_the_layers_is_named():
    sources = package_sources()
    sources["newthing"] = ""
    try:
        violations(sources)
    except AssertionError as e:
        assert "ctelm_jax.newthing is in no layer: add 'newthing'" in str(e)
    else:
        raise AssertionError("a module in no layer passed")
