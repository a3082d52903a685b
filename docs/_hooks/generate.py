"""MkDocs hook: the pages generated from the repository at build time.

* ``reference/``: one API page per public package of ``plasticity_lightning`` (mkdocstrings reads the docstrings),
  and an index of every name ``plasticity_lightning`` exports;
* ``recipes/``: one page per recipe in ``recipes/`` (its header comment, commands, runtime and the docs sections
  that quote its numbers) and one for the ``configs/`` fragments;
* ``gallery/``: one page per script in ``examples/``, run at build time in its quick mode with its output embedded.

A new package, recipe, fragment or example gets its page (and its place in the navigation) without editing
``mkdocs.yml``. Bad input (a recipe without a header, an example without its quick-mode line) fails the build with
one line naming the file.
"""

from __future__ import annotations

import ast
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "plasticity_lightning"
GALLERY_LINE = re.compile(r"^# docs-gallery:(.*)$", re.M)
RUNTIME_LINE = re.compile(r"^#\s*Runtime:\s*(.+)$", re.M | re.I)
GALLERY_TIMEOUT_S = 120

# ---------------------------------------------------------------------------------------------------------------
# the API reference


def _static_all(init: Path) -> list[str] | None:
    """The names a package's ``__init__.py`` lists in ``__all__`` (read without importing it), or None."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                return [ast.literal_eval(element) for element in node.value.elts]
    return None


def _module_summary(path: Path) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def reference_packages() -> list[tuple[str, Path]]:
    """Every public package: the top-level subpackages, and nested ones whose names their parent does not re-export.

    Returns:
        ``(dotted name, folder)`` pairs, sorted by name.
    """
    root = REPO / PACKAGE
    found = []
    for init in sorted(root.rglob("__init__.py")):
        folder = init.parent
        if folder == root or any(part.startswith("_") for part in folder.relative_to(root).parts):
            continue
        dotted = ".".join((PACKAGE, *folder.relative_to(root).parts))
        if folder.parent != root:
            names, parent_names = _static_all(init), _static_all(folder.parent / "__init__.py")
            if names is not None and parent_names is not None and set(names) <= set(parent_names):
                continue  # every name is documented on the parent's page
        found.append((dotted, folder))
    return found


def _reference_page(dotted: str, folder: Path) -> str:
    names = _static_all(folder / "__init__.py")
    lines = [f"# `{dotted}`", ""]
    if names is None:  # no re-exports: the package's docstring, then each public module
        lines += [ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or "", ""]
        for module in sorted(folder.glob("*.py")):
            if not module.name.startswith("_"):
                lines += [f"::: {dotted}.{module.stem}", "    options:", "      show_root_heading: true", ""]
        return "\n".join(lines)
    lines += [f"::: {dotted}", "    options:", "      show_root_heading: false", "      show_root_toc_entry: false"]
    lines += ["      members:", *[f"        - {name}" for name in names], ""]
    return "\n".join(lines)


def _reference_index(packages: list[tuple[str, Path]]) -> str:
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings (Google style, checked by ruff's pydocstyle rules). Every public package has",
        "a page; the names below are also importable from `plasticity_lightning` itself.",
        "",
        "| package | what it holds |",
        "|---|---|",
    ]
    for dotted, folder in packages:
        lines.append(
            f"| [`{dotted}`]({_reference_uri(dotted).removeprefix('reference/')}) | "
            f"{_module_summary(folder / '__init__.py')} |"
        )
    top = _static_all(REPO / PACKAGE / "__init__.py") or []
    exports = _top_level_exports()
    lines += ["", "## Top-level names", "", "| name | documented in |", "|---|---|"]
    for name in sorted(top, key=str.lower):
        where = exports.get(name)
        if where is None:
            continue
        page = _page_for_module(where, packages)
        if page is None:
            raise PluginError(f"{PACKAGE}.{name} comes from {where}, which has no reference page")
        target = f"{page.removeprefix('reference/')}#{where}.{name}" if where != f"{PACKAGE}.{name}" else page
        lines.append(f"| `{name}` | [`{where}`]({target.removeprefix('reference/')}) |")
    return "\n".join(lines) + "\n"


def _top_level_exports() -> dict[str, str]:
    """``plasticity_lightning._EXPORTS``: each lazily exported name and the module that defines it."""
    for node in ast.parse((REPO / PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "_EXPORTS":
            return ast.literal_eval(node.value)
    raise PluginError(f"{PACKAGE}/__init__.py has no _EXPORTS table to index")


def _reference_uri(dotted: str) -> str:
    return f"reference/{dotted.removeprefix(PACKAGE + '.').replace('.', '_')}.md"


def _page_for_module(module: str, packages: list[tuple[str, Path]]) -> str | None:
    for dotted, _ in sorted(packages, key=lambda item: -len(item[0])):
        if module == dotted or module.startswith(dotted + "."):
            return _reference_uri(dotted)
    return None


# ---------------------------------------------------------------------------------------------------------------
# the recipe catalog


def _header(path: Path) -> list[str]:
    """The recipe's leading comment block, without the ``#``."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" ") if line.strip() != "#" else "")
    return lines


def recipes() -> list[Path]:
    """Every recipe: ``recipes/*.yaml`` and the study specs in ``recipes/studies/``."""
    return sorted((REPO / "recipes").glob("*.yaml")) + sorted((REPO / "recipes" / "studies").glob("*.yaml"))


def _recipe_slug(path: Path) -> str:
    relative = path.relative_to(REPO / "recipes").with_suffix("")
    return "_".join(relative.parts)


def _split_header(path: Path) -> tuple[list[str], list[str], str | None]:
    """(prose lines, command lines, runtime) of a recipe's header comment."""
    header = _header(path)
    if not any(line.strip() for line in header):
        raise PluginError(f"{path.relative_to(REPO)}: a recipe starts with a comment saying what it runs")
    prose, commands, runtime = [], [], None
    for line in header:
        stripped = line.strip()
        match = RUNTIME_LINE.match("# " + stripped)
        if match:
            runtime = match.group(1).strip()
        elif line.startswith("  ") and re.match(r"(plasticity|pip|python|apt-get|wandb)\b", stripped):
            commands.append(stripped)
        else:
            prose.append(line)
    return prose, commands, runtime


MEASURED_PAGES = ("reproductions.md", "performance.md")


def _docs_mentions(stem: str, docs_pages: dict[str, str]) -> list[tuple[str, str, str]]:
    """(page, anchor, section title) of each section of the measured-results pages that names the recipe ``stem``."""
    pattern = re.compile(rf"(?<![\w/.-]){re.escape(stem)}(?:\.yaml)?(?![\w-])")
    found = []
    for uri in MEASURED_PAGES:
        section, anchor = None, ""
        for line in docs_pages.get(uri, "").splitlines():
            heading = re.match(r"^(#{1,3}) (.+)$", line)
            if heading:
                section = heading.group(2).strip()
                anchor = _slugify(section)
                continue
            if pattern.search(line) and section is not None and (uri, anchor, section) not in found:
                found.append((uri, anchor, section))
    return found


def _slugify(title: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    import unicodedata

    text = re.sub(r"<[^>]*>", "", title).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _recipe_page(path: Path, docs_pages: dict[str, str]) -> str:
    relative = path.relative_to(REPO).as_posix()
    prose, commands, runtime = _split_header(path)
    title = path.stem
    lines = [f"# `{title}`", ""]
    body = "\n".join(prose).strip()
    lines += [_as_markdown_prose(body), ""]
    lines += ["## Command", "", "```bash"]
    lines += commands or [f"plasticity {'study run' if 'studies' in relative else 'fit --config'} {relative}"]
    lines += ["```", ""]
    lines += ["## Expected runtime", "", _escape(runtime) if runtime else "Not stated in the recipe.", ""]
    mentions = _docs_mentions(path.stem, docs_pages)
    lines += ["## Numbers it reproduces", ""]
    if mentions:
        lines += ["Measured results of this recipe are quoted in:", ""]
        lines += [f"- [{section}](../{uri}#{anchor})" for uri, anchor, section in mentions]
    else:
        lines += ["No measured numbers are quoted for this recipe yet."]
    lines += ["", "## The recipe", "", f"`{relative}`:", "", "```yaml", path.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def _escape(text: str) -> str:
    """Plain comment text as Markdown that shows every character (``<k>``, ``*_fraction``, ``[a, b]``)."""
    text = html.escape(text, quote=False)
    return re.sub(r"([\\`*_\[\]#|])", r"\\\1", text)


def _as_markdown_prose(text: str) -> str:
    """A comment block as Markdown: indented lines stay preformatted, the rest is escaped prose."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        if all(line.startswith("  ") for line in block.splitlines() if line.strip()):
            out.append("```text\n" + "\n".join(line[2:] for line in block.splitlines()) + "\n```")
        else:
            out.append(_escape(block))
    return "\n\n".join(out)


def _recipes_index(all_recipes: list[Path]) -> str:
    lines = [
        "# Recipes",
        "",
        "Complete experiments, one YAML file each, run with `plasticity fit --config recipes/<name>.yaml` (study",
        "grids with `plasticity study run`). Every recipe is tested: it parses, `--print_config` round-trips, and it",
        "runs one `fast_dev_run` batch through the real entry point. These pages are generated from the recipes",
        "themselves: a new recipe gets its page. Reusable fragments to combine with any recipe are on",
        "[Config fragments](configs.md).",
        "",
        "| recipe | what it runs | runtime |",
        "|---|---|---|",
    ]
    for path in all_recipes:
        prose, _, runtime = _split_header(path)
        first = " ".join(" ".join(prose).split(". ")[0].split())
        first = first if first.endswith(".") else first + "."
        name = path.relative_to(REPO / "recipes").as_posix()
        lines.append(f"| [`{name}`]({_recipe_slug(path)}.md) | {_escape(first)} | {_escape(runtime or '–')} |")
    return "\n".join(lines) + "\n"


def _configs_page() -> str:
    lines = [
        "# Config fragments",
        "",
        "Reusable YAML fragments in `configs/`, combined with a recipe by repeating `--config` (later files override",
        "earlier ones key by key; a fragment whose key ends in `+` appends to a list):",
        "",
        "```bash",
        "plasticity fit --config recipes/quickstart.yaml --config configs/trainer/gpu.yaml"
        " --config configs/callbacks/monitors.yaml",
        "```",
        "",
    ]
    for group in sorted(p for p in (REPO / "configs").iterdir() if p.is_dir()):
        lines += [f"## `configs/{group.name}/`", ""]
        for path in sorted(group.glob("*.yaml")):
            header = " ".join(" ".join(_header(path)).split())
            lines += [f"### `{path.relative_to(REPO).as_posix()}`", "", _escape(header) or "(no header comment)", ""]
            lines += ["```yaml", path.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# the example gallery


def examples() -> list[Path]:
    """Every script in ``examples/``."""
    return sorted((REPO / "examples").glob("*.py"))


def gallery_arguments(path: Path) -> list[str]:
    """The quick-mode arguments an example declares on its ``# docs-gallery: ARGS`` line.

    ``{figure}`` among them stands for a PNG file the example writes; the gallery page shows it.
    """
    match = GALLERY_LINE.search(path.read_text())
    if match is None:
        raise PluginError(
            f"{path.relative_to(REPO)}: add a line '# docs-gallery: ARGS' with the arguments of a quick run "
            "(the docs run every example at build time)"
        )
    return match.group(1).split()


def _start_example(path: Path) -> tuple[subprocess.Popen, float, Path]:
    """Start an example's quick run (all examples run at once: the build waits for the slowest, not the sum)."""
    figure = Path(tempfile.mkdtemp(prefix="gallery-")) / f"{path.stem}.png"
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "WANDB_MODE": "disabled",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    arguments = [argument.replace("{figure}", str(figure)) for argument in gallery_arguments(path)]
    process = subprocess.Popen(
        [sys.executable, str(path), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=environment,
    )
    return process, time.perf_counter(), figure


def _finish_example(path: Path, process: subprocess.Popen, started: float) -> tuple[str, float]:
    try:
        stdout, stderr = process.communicate(timeout=GALLERY_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        process.kill()
        process.communicate()
        raise PluginError(f"{path.relative_to(REPO)}: its quick run took over {GALLERY_TIMEOUT_S} s") from error
    if process.returncode != 0:
        tail = stderr.strip().splitlines()[-1:] or ["(no error output)"]
        raise PluginError(f"{path.relative_to(REPO)} failed in the gallery run (exit {process.returncode}): {tail[0]}")
    return stdout, time.perf_counter() - started


OUTPUT_PLACEHOLDER = "<!-- gallery output: filled in when the page is rendered -->"
_RUNNING: dict[str, tuple[Path, subprocess.Popen, float, Path]] = {}


def _example_page(path: Path) -> str:
    source = path.read_text()
    doc = ast.get_docstring(ast.parse(source)) or ""
    title, _, rest = doc.partition("\n")
    rest = re.sub(r"::$", ":", rest.strip(), flags=re.M)  # reST's "text::" before a literal block reads "text:"
    arguments = " ".join(gallery_arguments(path))
    lines = [f"# `{path.name}`", "", title, "", rest, ""]
    lines += ["## Output of a quick run", "", OUTPUT_PLACEHOLDER, ""]
    lines += ["```bash", f"python examples/{path.name} {arguments}", "```", ""]
    lines += ["<!-- output -->", ""]
    lines += ["## Source", "", "```python", source.rstrip(), "```", ""]
    return "\n".join(lines)


def _with_output(
    markdown: str, site_dir: str, path: Path, process: subprocess.Popen, started: float, figure: Path
) -> str:
    output, seconds = _finish_example(path, process, started)
    block = '<pre class="gallery-output"><code>' + html.escape(output.rstrip()) + "</code></pre>"
    if "{figure}" in " ".join(gallery_arguments(path)):
        if not figure.is_file():
            raise PluginError(f"{path.relative_to(REPO)} was given --plot {{figure}} but wrote no figure")
        target = Path(site_dir) / "gallery" / figure.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(figure, target)  # beside the page, which is written after this hook
        block += f'\n\n<img class="gallery-figure" src="{figure.name}" alt="the figure {path.name} drew">'
    shutil.rmtree(figure.parent, ignore_errors=True)
    markdown = markdown.replace(OUTPUT_PLACEHOLDER, f"Run while this site was built ({seconds:.1f} s):", 1)
    return markdown.replace("<!-- output -->", block, 1)


def _gallery_index(all_examples: list[Path]) -> str:
    lines = [
        "# Example gallery",
        "",
        "Plain PyTorch loops that use the library's algorithms (no Lightning, no trainer). Every script here is run",
        "when the site is built, in a quick mode, and its output is embedded in its page.",
        "",
        "| example | what it shows |",
        "|---|---|",
    ]
    for path in all_examples:
        title = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n")[0]
        lines.append(f"| [`{path.name}`]({path.stem}.md) | {title} |")
    return "\n".join(lines) + "\n"


def _recipe_nav(slugs: list[str]) -> list[Any]:
    """Nav entries for the recipe pages: recipes whose names share a first word (three or more) form one section,
    titled by their longest common prefix (``plasticity_loss_digits``, ``grokking``, ``studies_phase``)."""
    families: dict[str, list[str]] = {}
    for slug in slugs:
        families.setdefault(slug.split("_")[0], []).append(slug)
    entries: list[Any] = []
    for members in families.values():
        if len(members) < 3:
            entries += [{slug: f"recipes/{slug}.md"} for slug in members]
            continue
        words = [slug.split("_") for slug in members]
        differ = (i for i, group in enumerate(zip(*words, strict=False)) if len(set(group)) > 1)
        common = next(differ, min(map(len, words)))
        title = "_".join(words[0][:common])
        entries.append({f"{title}…": [{slug: f"recipes/{slug}.md"} for slug in members]})
    return entries


# ---------------------------------------------------------------------------------------------------------------
# mkdocs hooks


def on_config(config: Any) -> Any:
    """Put the generated pages into the navigation: after the hand-written entries of their sections."""
    generated = {
        "Recipes": ["recipes/index.md", "recipes/configs.md", *_recipe_nav([_recipe_slug(p) for p in recipes()])],
        "Example gallery": ["gallery/index.md"] + [{p.stem: f"gallery/{p.stem}.md"} for p in examples()],
        "API reference": ["reference/index.md"]
        + [{dotted.removeprefix(PACKAGE + "."): _reference_uri(dotted)} for dotted, _ in reference_packages()],
    }
    nav = []
    for entry in config["nav"]:
        title, _value = next(iter(entry.items())) if isinstance(entry, dict) else (None, entry)
        nav.append({title: generated[title]} if title in generated else entry)
    config["nav"] = nav
    return config


def on_pre_build(config: Any) -> None:
    """Start every example's quick run; they run while the other pages are generated and rendered."""
    _RUNNING.clear()
    for path in examples():
        _RUNNING[f"gallery/{path.stem}.md"] = (path, *_start_example(path))


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Embed an example's output in its gallery page (waiting for its run if it is still going)."""
    running = _RUNNING.pop(page.file.src_uri, None)
    return markdown if running is None else _with_output(markdown, kwargs["config"].site_dir, *running)


def on_post_build(config: Any) -> None:
    """Stop any run whose page was not rendered (a failed build)."""
    for _, process, _, figure in _RUNNING.values():
        process.kill()
        process.communicate()
        shutil.rmtree(figure.parent, ignore_errors=True)
    _RUNNING.clear()


def on_files(files: Files, config: Any) -> Files:
    """Generate the API reference, the recipe catalog and the gallery."""
    docs_pages = {
        f.src_uri: Path(f.abs_src_path).read_text()
        for f in files.documentation_pages()
        if f.abs_src_path and not f.src_uri.startswith(("recipes/", "reference/", "gallery/"))
    }
    pages: dict[str, str] = {}
    packages = reference_packages()
    pages["reference/index.md"] = _reference_index(packages)
    for dotted, folder in packages:
        pages[_reference_uri(dotted)] = _reference_page(dotted, folder)
    all_recipes = recipes()
    pages["recipes/index.md"] = _recipes_index(all_recipes)
    pages["recipes/configs.md"] = _configs_page()
    for path in all_recipes:
        pages[f"recipes/{_recipe_slug(path)}.md"] = _recipe_page(path, docs_pages)
    all_examples = examples()
    pages["gallery/index.md"] = _gallery_index(all_examples)
    for path in all_examples:
        pages[f"gallery/{path.stem}.md"] = _example_page(path)
    for uri, content in pages.items():
        files.append(File.generated(config, uri, content=content))
    return files


def on_page_content(html_text: str, **kwargs: Any) -> str:
    """Sphinx roles in docstrings (``:class:`X```) render as plain code, without the role's name."""
    return re.sub(r":(?:class|func|meth|mod|attr|data|exc|obj|ref):(<code>)", r"\1", html_text)
