"""MkDocs hook: the tools' command-line options, from their ``--help``, generated when the site is built (and the
API page's constants, listed from each module's ``__all__``, and the operator table, ``<!-- operator-table -->``,
read from :mod:`pide_zoo.layers.ops.table`).

A page says ``<!-- help: tools/NAME.py -->``, on a line of its own, where the options go; the hook runs
``python tools/NAME.py --help`` (all of them in one process, before the pages are read) and puts the output there
as a code block. Where a tool cannot
run (say, mmseg is not installed on a docs-only build), the page says so instead and the build goes on; the test
suite checks, in the full environment, that every marker became a usage text.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict

log = logging.getLogger('mkdocs.hooks.help')
MARKER = re.compile(r'^<!--\s*help:\s*(?P<path>(?:tools|benchmarks)/[\w.-]+\.py)\s*-->[ \t]*$', re.MULTILINE)
ROOT = Path(__file__).resolve().parents[1]
_help: Dict[str, str] = {}


# Runs in one child process: the tools share the imports (torch, timm, mmseg), which cost seconds each.
_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = {}
for tool in sys.argv[1:]:
    sys.argv = [tool, '--help']
    sys.path.insert(0, tool.rsplit('/', 1)[0])  # as `python tool` does: its folder's modules import
    buf = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(tool, run_name='__main__')
        except SystemExit as e:
            code = e.code or 0
        except BaseException as e:
            code = f'{type(e).__name__}: {e}'
    sys.path.pop(0)
    out[tool] = [code, buf.getvalue()]
print(json.dumps(out))
"""


def on_pre_build(config, **kwargs) -> None:
    """Run every tool named by a marker with ``--help`` (in one child process)."""
    docs = Path(config['docs_dir'])
    tools = sorted({m['path'] for page in docs.rglob('*.md') for m in MARKER.finditer(page.read_text('utf-8'))})
    for tool in tools:
        if not (ROOT / tool).is_file():
            raise FileNotFoundError(f'docs: a page asks for the --help of {tool}, which does not exist')
    env = dict(os.environ, COLUMNS='100', PYTHONWARNINGS='ignore', OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', _RUNNER, *tools], cwd=ROOT, env=env, text=True,
                            capture_output=True, timeout=300)
    _help.clear()
    try:
        outputs = json.loads(result.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        log.info('the tools\' --help could not run here: %s', result.stderr.strip()[-300:])
        return
    for tool, (code, text) in outputs.items():
        if code == 0:
            _help[tool] = text.rstrip()
        else:
            log.info('%s --help failed here (%s): %s', tool, code, text.strip()[-300:])


CONSTANTS = re.compile(r'^<!--\s*constants:\s*(?P<module>pide_zoo[\w.]*)\s*-->[ \t]*$', re.MULTILINE)


def _constants(module: str) -> str:
    """mkdocstrings entries for the upper-case names in ``module``'s ``__all__`` (read from its source)."""
    path = ROOT.joinpath(*module.split('.'))
    path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
    names = next(ast.literal_eval(node.value) for node in ast.walk(ast.parse(path.read_text('utf-8')))
                 if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets))
    options = ('    options:\n      show_if_no_docstring: true\n      show_root_full_path: false\n'
               '      heading_level: 5\n')
    return '\n'.join(f'::: {module}.{name}\n{options}' for name in names if name.isupper())


OPERATOR_TABLE = re.compile(r'^<!--\s*operator-table\s*-->[ \t]*$', re.MULTILINE)
FORMS = {'difference': 'Σ_j w_ij (V_j − V_i)', 'negated_difference': 'Σ_j w_ij (V_i − V_j)', 'sum': 'Σ_j w_ij V_j'}


def operator_table() -> str:
    """The operator table as Markdown, one row per registered operator."""
    from pide_zoo.layers.ops import table

    rows = ['| operator | aliases | x | W(x) | form | s (default) | c (n = 2, default s) | τ | row sums | kernels |',
            '|---|---|---|---|---|---|---|---|---|---|']
    for name in table.operator_names():
        op = table.get_operator(name)
        s = op.default_s(2)
        x = '\\|θ_i − φ_j\\|²' if op.variable == 'distance' else 'θ_i · φ_j'
        rows.append(
            f"| `{name}` | {', '.join(f'`{a}`' for a in op.aliases)} | {x} | {op.formula or '–'} | "
            f"{FORMS[op.form]} | {'–' if s is None else f'{s:g}'} | {op.pide_constant(s, 2, op.params):.6g} | "
            f"{f'{op.tau:g}' if op.variable == 'distance' else '–'} | {'yes' if op.needs_rowsum('key') else 'no'} | "
            f"{', '.join(f'`{k}`' for k in op.kernels) or '–'} |")
    return '\n'.join(rows)


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    """Replace each marker by its tool's ``--help`` output, each constants marker by API entries and the
    operator-table marker by the table."""
    markdown = CONSTANTS.sub(lambda m: _constants(m['module']), markdown)
    if OPERATOR_TABLE.search(markdown):
        try:
            markdown = OPERATOR_TABLE.sub(lambda m: operator_table(), markdown)
        except ImportError as e:  # a docs-only build without torch
            markdown = OPERATOR_TABLE.sub(f'!!! note\n    The operator table needs pide_zoo installed ({e}).', markdown)

    def block(match: re.Match) -> str:
        tool = match['path']
        if tool in _help:
            return f'```text\n$ python {tool} --help\n{_help[tool]}\n```'
        return (f'!!! note\n    `python {tool} --help` could not run where this site was built '
                '(its dependencies are not installed); run it in the full environment.')
    return MARKER.sub(block, markdown)


SPHINX_ROLE = re.compile(r':(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):<code>(~?)([^<]*)</code>')


def on_page_content(html: str, page, config, files, **kwargs) -> str:
    """Docstrings written for Sphinx (``:class:`~a.B```) shown as code (``B``), not as the raw role."""
    return SPHINX_ROLE.sub(lambda m: f'<code>{m[2].rsplit(".", 1)[-1] if m[1] else m[2]}</code>', html)
