"""tools/render_tables.py: JSON results rendered as Markdown tables; the repository's tables match their JSON."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / 'tools' / 'render_tables.py'


def _load_tool():
    spec = importlib.util.spec_from_file_location('render_tables', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_tool()

RESULT = {
    'name': 'toy', 'title': 'A toy table', 'command': 'python benchmarks/bench_toy.py --repeats 3',
    'environment': {'cpu': 'Toy CPU (2 CPUs)', 'threads': 2, 'torch': '2.14.1', 'device': 'cpu',
                    'date': '2026-12-05'},
    'columns': ['block', 'ms', 'MB', 'ratio'],
    'rows': [['PIDEBlock', 958, 599.5, '0.15×'], ['NonLocal2d | EG', 6586, None, '1.00×']],
    'notes': 'Each case in a fresh process.',
}


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=cwd, capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / 'docs' / 'benchmarks').mkdir(parents=True)
    (tmp_path / 'docs' / 'benchmarks' / 'toy.json').write_text(json.dumps(RESULT))
    page = tmp_path / 'docs' / 'page.md'
    page.write_text('# Page\n\nBefore.\n\n<!-- table: docs/benchmarks/toy.json -->\nold\n<!-- /table -->\n\nAfter.\n')
    return tmp_path


def test_render_table_has_header_rows_command_and_environment():
    text = rt.render_table(RESULT)
    lines = text.splitlines()
    assert lines[0] == '| block | ms | MB | ratio |'
    assert lines[1] == '|---|---|---|---|'
    assert lines[2] == '| PIDEBlock | 958 | 599.5 | 0.15× |'
    assert lines[3] == '| NonLocal2d \\| EG | 6,586 | – | 1.00× |'  # pipes escaped, thousands, null as a dash
    assert 'Command: `python benchmarks/bench_toy.py --repeats 3`' in text
    assert 'Measured on Toy CPU (2 CPUs), 2 threads, torch 2.14.1, cpu, 2026-12-05.' in text
    one = rt.render_table({**RESULT, 'environment': {**RESULT['environment'], 'threads': 1}})
    assert 'Measured on Toy CPU (2 CPUs), 1 thread, torch' in one
    assert text.endswith('Each case in a fresh process.')


def test_replaces_only_between_markers_and_is_idempotent(repo):
    page = repo / 'docs' / 'page.md'
    assert _run('--root', repo, page).returncode == 0
    text = page.read_text()
    assert text.startswith('# Page\n\nBefore.\n\n<!-- table: docs/benchmarks/toy.json -->\n| block |')
    assert text.endswith('<!-- /table -->\n\nAfter.\n')
    assert 'old' not in text and rt.render_table(RESULT) in text
    assert _run('--root', repo, page).stdout == ''  # nothing left to change
    assert page.read_text() == text


def test_check_names_a_stale_table_and_changes_nothing(repo):
    page = repo / 'docs' / 'page.md'
    _run('--root', repo, page)
    assert _run('--check', '--root', repo, page).returncode == 0
    edited = page.read_text().replace('6,586', '6,000')  # a hand-edited number
    page.write_text(edited)
    result = _run('--check', '--root', repo, page)
    assert result.returncode == 1
    assert f'{page}:5: table docs/benchmarks/toy.json differs from its JSON' in result.stderr
    assert page.read_text() == edited


def test_default_files_are_readme_and_docs(repo):
    (repo / 'README.md').write_text('<!-- table: docs/benchmarks/toy.json -->\n<!-- /table -->\n')
    assert rt.markdown_files(repo) == [repo / 'README.md', repo / 'docs' / 'page.md']
    result = _run('--check', '--root', repo)
    assert result.returncode == 1
    assert 'README.md:1' in result.stderr and 'page.md:5' in result.stderr


@pytest.mark.parametrize('content, message', [
    (None, 'no such file'),
    ('{"name": "toy", ', 'not readable JSON'),
    ('[]', 'expected a JSON object'),
    (json.dumps({**RESULT, 'rows': [[1, 2]]}), 'row 0 must be a list of 4 values'),
    (json.dumps({**RESULT, 'environment': {**RESULT['environment'], 'threads': '2'}}), '"environment.threads"'),
    (json.dumps({k: v for k, v in RESULT.items() if k != 'command'}), '"command" must be a str'),
])
def test_missing_or_corrupt_json_is_named(repo, content, message):
    path = repo / 'docs' / 'benchmarks' / 'toy.json'
    if content is None:
        path.unlink()
    else:
        path.write_text(content)
    page = repo / 'docs' / 'page.md'
    for args in (('--root', repo, page), ('--check', '--root', repo, page)):
        result = _run(*args)
        assert result.returncode == 2
        assert f'{page}:5: {path}: {message}' in result.stderr
        assert 'Traceback' not in result.stderr


@pytest.mark.parametrize('text, message', [
    ('<!-- table: docs/benchmarks/toy.json -->\nno end\n', 'has no closing'),
    ('<!-- /table -->\n', 'without an opening'),
])
def test_broken_markers_are_named(repo, text, message):
    page = repo / 'docs' / 'page.md'
    page.write_text(text)
    result = _run('--root', repo, page)
    assert result.returncode == 2 and message in result.stderr and str(page) in result.stderr


def test_repository_tables_match_their_json():
    """Every table in README.md and docs/ is its JSON's rendering: a hand-edited number fails here."""
    result = _run('--check')
    assert result.returncode == 0, result.stderr + result.stdout
    marked = [p for p in rt.markdown_files() if rt.BEGIN.search(p.read_text(encoding='utf-8'))]
    assert ROOT / 'README.md' in marked
