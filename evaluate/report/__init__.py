"""What evaluate writes for people: report.md (markdown.py), PNG and CSV plots (plots.py), and every figure's
column title, format and direction of "better" (columns.py)."""
