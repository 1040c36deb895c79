"""Unit tests of the runbook checker's parsing and comparison (`python3 -m unittest scripts/runbook_test.py`)."""

import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runbook import ROOT, RUNBOOK as RUNBOOK_FILE, Matcher, compare, parse_runbook  # noqa: E402

RUNBOOK = """
```sh
outside the runbook: never run
```
<!-- runbook -->
<!-- runbook: demo -->
```sh
first
```
```json
{"a": 1}
```
Prose.
```sh
no answer: prose follows
```
Prose again.
```sh
answer after a blank line
```

```
text
```
<!-- runbook: demo --date 2115-08-01 -->
```bash
not sh: shown, never run
```
<!-- /runbook -->
"""


class ParseTest(unittest.TestCase):
    def test_pairs_commands_with_the_blocks_right_after_them(self):
        steps = parse_runbook(RUNBOOK)
        self.assertEqual(steps[0].demo_args, [])
        commands = [(s.command, s.answer) for s in steps if s.command is not None]
        self.assertEqual(
            commands,
            [("first", '{"a": 1}'), ("no answer: prose follows", None), ("answer after a blank line", "text")],
        )
        self.assertEqual(steps[-1].demo_args, ["--date", "2115-08-01"])

    def test_an_unclosed_section_is_an_error(self):
        with self.assertRaises(SystemExit):
            parse_runbook("<!-- runbook -->\n```sh\nx\n```\n")


class RunbookFileTest(unittest.TestCase):
    def test_the_runbook_file_starts_a_demo_and_holds_commands(self):
        steps = parse_runbook(RUNBOOK_FILE.read_text())
        self.assertIsNotNone(steps[0].demo_args, f"{RUNBOOK_FILE} must start with <!-- runbook: demo ... -->")
        self.assertGreater(sum(1 for s in steps if s.command), 0)

    def test_no_other_markdown_file_holds_a_runbook_section_nobody_runs(self):
        for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
            if path != RUNBOOK_FILE:
                self.assertNotIn("<!-- runbook", path.read_text(), f"{path} holds a runbook section: only {RUNBOOK_FILE} is run")


class CompareTest(unittest.TestCase):
    def ok(self, expected, actual, matcher=None):
        return compare(matcher or Matcher(), expected, actual)[0]

    def test_json_is_compared_as_json(self):
        self.assertTrue(self.ok('{ "a": 1, "b": [true] }', '{\n  "b": [\n    true\n  ],\n  "a": 1\n}'))
        self.assertFalse(self.ok('{"a": 1}', '{"a": 2}'))
        self.assertFalse(self.ok('{"a": 1}', '{"a": 1, "b": 2}'))
        self.assertFalse(self.ok('{"a": 1}', '{"a": 1}\n{"a": 1}'))
        self.assertFalse(self.ok('{"a": true}', '{"a": 1}'))

    def test_text_after_json_is_compared_line_by_line(self):
        expected = '{"s": 1}\nERROR:\n  Code: DeadlineExceeded'
        self.assertTrue(self.ok(expected, '{\n  "s": 1\n}\nERROR:\n\tCode:   DeadlineExceeded\n'))
        self.assertFalse(self.ok(expected, '{"s": 1}\nERROR:\n  Code: Unavailable'))
        self.assertFalse(self.ok(expected, '{"s": 1}\nERROR:\n  Code: DeadlineExceeded\nmore'))

    def test_no_answer_means_no_output(self):
        self.assertTrue(self.ok("", ""))
        self.assertFalse(self.ok("", "something"))

    def test_placeholders_match_only_their_kind(self):
        self.assertTrue(self.ok('{"t": "<time>"}', '{"t": "2118-03-01T09:00:18.282011824Z"}'))
        self.assertFalse(self.ok('{"t": "<time>"}', '{"t": "2118-03-01"}'))
        self.assertTrue(self.ok('{"n": "decision <uuid>"}', '{"n": "decision 07422ded-c5da-4de8-a475-a9990e3d1531"}'))
        self.assertFalse(self.ok('{"n": "decision <uuid>"}', '{"n": "decision none"}'))
        self.assertTrue(self.ok("card <serial> ok", "card ZJ0531777126 ok"))
        self.assertFalse(self.ok("card <serial> ok", "card ZJ05 ok"))
        self.assertFalse(self.ok('{"a": "<nope>"}', '{"a": "x"}'))

    def test_a_named_placeholder_is_one_value_throughout(self):
        matcher = Matcher()
        self.assertTrue(self.ok('{"s": "<serial:zhou>"}', '{"s": "ZJ0000000001"}', matcher))
        self.assertTrue(self.ok("card <serial:zhou>", "card ZJ0000000001", matcher))
        self.assertFalse(self.ok("card <serial:zhou>", "card ZJ0000000002", matcher))
        self.assertTrue(self.ok("card <serial:other>", "card ZJ0000000002", matcher))

    def test_the_diff_shows_matched_placeholders_as_written(self):
        ok, want, got = compare(Matcher(), '{"t": "<time>", "a": 1}', '{"t": "2118-03-01T09:00:00Z", "a": 2}')
        self.assertFalse(ok)
        self.assertIn('"<time>"', got)
        self.assertIn('"a": 2', got)


if __name__ == "__main__":
    unittest.main()
