"""Session-wide test setup."""


def pytest_collection_finish(session):
    """Start the process server (tests/helpers/dist_utils.py) as soon as the tests are known,
    when any of them may start ranks or commands: it imports torch and the package while
    the first tests run."""
    if any("/unit/" not in str(item.path) for item in session.items):
        from tests.helpers.dist_utils import start_server

        start_server()
