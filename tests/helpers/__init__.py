"""What the tests share, and nothing collected by pytest: data writers, plain reference
computations, rank-side workers, settings and tolerances. Test files import from here and
never from one another (tests/unit/test_test_layout.py checks it)."""
