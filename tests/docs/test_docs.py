"""The documentation: README size, a strict MkDocs build, an API entry for every public name and model, the tools'
options generated from their --help, and a PyPI description that resolves outside the repository."""
import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_LIMIT = 12 * 1024
# Modules whose __all__ the API reference must cover, and the other documented modules that may hold the entry of a
# re-exported name (pide_zoo.PIDEBlock is documented as pide_zoo.layers.PIDEBlock).
API_MODULES = ('pide_zoo', 'pide_zoo.layers', 'pide_zoo.seg', 'pide_zoo.cls', 'pide_zoo.checkpoint', 'pide_zoo.flops',
               'pide_zoo.export', 'pide_zoo.analysis')
DOCUMENTED = API_MODULES + ('pide_zoo.models',)
HELP_MARKER = re.compile(r'^<!--\s*help:\s*(?P<path>(?:tools|benchmarks)/[\w.-]+\.py)\s*-->[ \t]*$', re.MULTILINE)


def _module_all(module: str) -> list:
    """``__all__`` of a pide_zoo module, read from its source (no import: pide_zoo.seg needs mmseg)."""
    path = ROOT.joinpath(*module.split('.'))
    path = path / '__init__.py' if path.is_dir() else path.with_suffix('.py')
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError(f'{path} has no __all__')


def test_readme_is_short():
    size = (ROOT / 'README.md').stat().st_size
    assert size <= README_LIMIT, f'README.md is {size} bytes; keep it within {README_LIMIT} (details go to docs/)'


def test_readme_keeps_the_two_setup_commands_that_ci_runs():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    for command in ('bash tools/install.sh', '.venv/bin/ruff check . && .venv/bin/python -m pytest'):
        assert f'\n{command}\n' in readme and f'\n{command}\n' in ci


def test_pypi_description_has_no_relative_links():
    """setup.cfg's long description is shown on PyPI, where repository-relative links and images break."""
    text = (ROOT / 'docs' / 'pypi.md').read_text(encoding='utf-8')
    targets = re.findall(r'\]\(([^)]+)\)', text) + re.findall(r'src="([^"]+)"', text)
    assert all(t.startswith(('https://', 'http://')) for t in targets), targets
    assert 'long_description = file: docs/pypi.md' in (ROOT / 'setup.cfg').read_text(encoding='utf-8')


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    for module in ('mkdocs', 'material', 'mkdocstrings', 'mkdocstrings_handlers.python'):
        if importlib.util.find_spec(module.split('.')[0]) is None:
            pytest.skip(f'{module} is not installed (pip install -e .[docs])')
    out = tmp_path_factory.mktemp('site')
    env = dict(os.environ, NO_MKDOCS_2_WARNING='1')
    result = subprocess.run([sys.executable, '-m', 'mkdocs', 'build', '--strict', '--site-dir', str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f'mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}'
    return out


def _ids(html: str) -> set:
    return set(re.findall(r'\bid="([^"]+)"', html))


def test_site_builds_every_page(site):
    nav_pages = re.findall(r':\s*(\S+\.md)\s*$', (ROOT / 'mkdocs.yml').read_text(encoding='utf-8'), re.MULTILINE)
    assert 'api.md' in nav_pages
    for page in nav_pages:
        built = site / ('index.html' if page == 'index.md' else page[:-3] + '/index.html')
        assert built.is_file(), f'{page} was not built'
    assert (site / 'figures' / 'demo_longrange.png').is_file()


def test_every_public_name_has_an_api_entry(site):
    ids = _ids((site / 'api' / 'index.html').read_text(encoding='utf-8'))
    missing = []
    for module in API_MODULES:
        for name in _module_all(module):
            if name == '__version__':
                continue
            if not any(f'{where}.{name}' in ids for where in (module,) + DOCUMENTED):
                missing.append(f'{module}.{name}')
    assert not missing, f'no API entry for {missing}: give them docstrings and check docs/api.md'


def test_every_registered_model_has_an_api_entry(site):
    timm = pytest.importorskip('timm')
    sys.path.insert(0, str(ROOT / 'tests'))
    try:
        from timm_suite.timm_source import pide_models
    finally:
        sys.path.remove(str(ROOT / 'tests'))
    ids = _ids((site / 'api' / 'index.html').read_text(encoding='utf-8'))
    models = pide_models()
    assert models
    missing = [name for name in models if f'{timm.models.model_entrypoint(name).__module__}.{name}' not in ids]
    assert not missing, f'registered timm models without an API entry: {missing}'


def test_tool_options_come_from_their_help(site):
    """Each ``<!-- help: tools/X.py -->`` marker became the tool's usage text (where the tool can run here)."""
    full_env = importlib.util.find_spec('mmseg') is not None and importlib.util.find_spec('onnx') is not None
    seen = 0
    for page in sorted((ROOT / 'docs').glob('*.md')):
        tools = HELP_MARKER.findall(page.read_text(encoding='utf-8'))
        if not tools:
            continue
        html = (site / page.stem / 'index.html').read_text(encoding='utf-8')
        for tool in tools:
            seen += 1
            generated = re.search(rf'\$ python {re.escape(tool)} --help\s*(?:<[^>]*>\s*)*usage:', html) is not None
            if full_env:
                assert generated, f'{page.name}: no --help output of {tool}'
            elif not generated:
                assert f'python {tool} --help</code> could not run' in html
    assert seen >= 10


def test_operators_page_renders_the_operator_table(site):
    """The operators page shows the table itself: each paper operator with its form, order and width scale."""
    from pide_zoo.layers import get_operator

    html = (site / 'operators' / 'index.html').read_text(encoding='utf-8')
    assert '&lt;!-- operator-table' not in html and '<!-- operator-table' not in html
    for name, cells in (('diffusion', ['<code>embedded_gaussian</code>']), ('frac_laplacian', ['0.5', '1.5']),
                        ('inv_frac_laplacian', ['0.159155']), ('log', ['0.0795775', '−log x − γ'])):
        row = re.search(rf'<tr>\s*<td><code>{name}</code></td>(.*?)</tr>', html, re.S)
        assert row, name
        assert all(c in row[1] for c in cells), (name, row[1])
        formula = re.sub(r'`([^`]*)`', r'<code>\1</code>', get_operator(name).formula)
        assert formula in row[1], (formula, row[1])
