#!/usr/bin/env python
"""Render recorded benchmark results (JSON) as Markdown tables inside README.md and docs/*.md.

A table's place in a Markdown file is marked by two comments, each on a line of its own; everything between
them is generated:

    <!-- table: docs/benchmarks/nonlocal_peers.json -->
    (generated: the table, the command that measured it, the environment)
    <!-- /table -->

The JSON file (path relative to the repository root) follows the benchmarks' schema::

    {"name": str, "title": str, "command": str,
     "environment": {"cpu": str, "threads": int, "torch": str, "device": str, "date": str},
     "columns": [str, ...], "rows": [[value, ...], ...], "notes": str (optional)}

    python tools/render_tables.py            # rewrite every marked table in README.md and docs/**/*.md
    python tools/render_tables.py --check    # exit 1 listing every table that differs from its JSON

Exit status: 0 done (or, with --check, every table current), 1 stale tables (--check), 2 a missing or
corrupt JSON file or a broken marker, named with the Markdown file that refers to it.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
# Markers stand alone on their lines, so prose can mention them.
BEGIN = re.compile(r'^<!--\s*table:\s*(?P<path>\S+)\s*-->[ \t]*$', re.MULTILINE)
END = re.compile(r'^<!--\s*/table\s*-->[ \t]*$', re.MULTILINE)
REQUIRED = {'name': str, 'title': str, 'command': str, 'environment': dict, 'columns': list, 'rows': list}
ENVIRONMENT = {'cpu': str, 'threads': int, 'torch': str, 'device': str, 'date': str}


class TableError(Exception):
    """A marker or JSON file that cannot be rendered; the message names the file."""


def load_result(path: Path) -> Dict[str, Any]:
    """Read and validate one result file, raising :class:`TableError` that names it."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except FileNotFoundError:
        raise TableError(f'{path}: no such file') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f'{path}: not readable JSON ({e})') from None
    if not isinstance(data, dict):
        raise TableError(f'{path}: expected a JSON object, got {type(data).__name__}')
    for key, kind in REQUIRED.items():
        if not isinstance(data.get(key), kind):
            raise TableError(f'{path}: "{key}" must be a {kind.__name__}')
    for key, kind in ENVIRONMENT.items():
        value = data['environment'].get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TableError(f'{path}: "environment.{key}" must be a {kind.__name__}')
    if 'notes' in data and not isinstance(data['notes'], str):
        raise TableError(f'{path}: "notes" must be a str')
    width = len(data['columns'])
    for i, row in enumerate(data['rows']):
        if not isinstance(row, list) or len(row) != width:
            raise TableError(f'{path}: row {i} must be a list of {width} values (one per column)')
    return data


def format_cell(value: Any) -> str:
    """A JSON value as a Markdown table cell: null as a dash, numbers with thousands separators."""
    if value is None:
        return '–'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return format(value, ',')
    return str(value).replace('|', '\\|').replace('\n', ' ')


def render_table(data: Dict[str, Any]) -> str:
    """The Markdown for one result: the table, its command and its environment."""
    lines = ['| ' + ' | '.join(format_cell(c) for c in data['columns']) + ' |',
             '|' + '---|' * len(data['columns'])]
    lines += ['| ' + ' | '.join(format_cell(v) for v in row) + ' |' for row in data['rows']]
    env = data['environment']
    lines += ['', f'Command: `{data["command"]}`  ',
              f'Measured on {env["cpu"]}, {env["threads"]} thread{"s" * (env["threads"] != 1)}, torch {env["torch"]}, '
              f'{env["device"]}, {env["date"]}.']
    if data.get('notes'):
        lines += ['', data['notes']]
    return '\n'.join(lines)


def render_markdown(text: str, source: Path, root: Path = ROOT) -> str:
    """``text`` with every marked table replaced by its JSON's rendering (``source`` names the file in errors)."""
    out: List[str] = []
    pos = 0
    while True:
        begin = BEGIN.search(text, pos)
        if begin is None:
            unmatched = END.search(text, pos)
            if unmatched:
                line = text.count('\n', 0, unmatched.start()) + 1
                raise TableError(f'{source}:{line}: <!-- /table --> without an opening <!-- table: PATH -->')
            out.append(text[pos:])
            return ''.join(out)
        line = text.count('\n', 0, begin.start()) + 1
        end = END.search(text, begin.end())
        nested = BEGIN.search(text, begin.end())
        if end is None or (nested is not None and nested.start() < end.start()):
            raise TableError(f'{source}:{line}: <!-- table: {begin["path"]} --> has no closing <!-- /table -->')
        try:
            data = load_result(root / begin['path'])
        except TableError as e:
            raise TableError(f'{source}:{line}: {e}') from None
        out += [text[pos:begin.end()], '\n', render_table(data), '\n', text[end.start():end.end()]]
        pos = end.end()


def stale_tables(text: str, source: Path, root: Path = ROOT) -> List[str]:
    """Descriptions (``file:line: path``) of the marked tables in ``text`` that differ from their JSON."""
    rendered = render_markdown(text, source, root)
    if rendered == text:
        return []
    old = _blocks(text)
    new = _blocks(rendered)
    return [f'{source}:{line}: table {path} differs from its JSON'
            for (line, path, a), (_, _, b) in zip(old, new) if a != b]


def _blocks(text: str) -> List[tuple]:
    blocks = []
    for begin in BEGIN.finditer(text):
        end = END.search(text, begin.end())
        blocks.append((text.count('\n', 0, begin.start()) + 1, begin['path'], text[begin.end():end.start()]))
    return blocks


def markdown_files(root: Path = ROOT) -> List[Path]:
    """The files this script keeps current by default: README.md and every Markdown file under docs/."""
    files = [root / 'README.md'] if (root / 'README.md').exists() else []
    return files + sorted((root / 'docs').rglob('*.md'))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description='Render docs/benchmarks/*.json as Markdown tables between <!-- table: PATH --> and '
                    '<!-- /table --> markers (paths relative to the repository root).')
    parser.add_argument('files', nargs='*', type=Path,
                        help='Markdown files (default: README.md and docs/**/*.md)')
    parser.add_argument('--check', action='store_true',
                        help='change nothing; exit 1 listing every table that differs from its JSON')
    parser.add_argument('--root', type=Path, default=ROOT,
                        help='directory the JSON paths are relative to (default: the repository root)')
    args = parser.parse_args(argv)
    files: Iterable[Path] = args.files or markdown_files(args.root)
    stale: List[str] = []
    errors: List[str] = []
    for path in files:
        try:
            text = path.read_text(encoding='utf-8')
            if args.check:
                stale += stale_tables(text, path, args.root)
            else:
                rendered = render_markdown(text, path, args.root)
                if rendered != text:
                    path.write_text(rendered, encoding='utf-8')
                    print(f'rendered {path}')
        except TableError as e:
            errors.append(str(e))
        except OSError as e:
            errors.append(f'{path}: {e}')
    for message in errors:
        print(f'error: {message}', file=sys.stderr)
    for message in stale:
        print(message, file=sys.stderr)
    if errors:
        return 2
    if stale:
        print(f'{len(stale)} stale table(s): run python tools/render_tables.py', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
