"""/openapi.json describes every route, and the live gateway keeps to it (schemathesis)."""

import subprocess
import sys

import requests

from conftest import token
from settings import load_settings


def test_every_route_is_described(gateway):
    document = requests.get(f'{gateway.url}/openapi.json', timeout=10).json()
    operations = {(method, path) for path, methods in document['paths'].items() for method in methods}
    assert {('post', '/{service_name}/annotate'), ('post', '/{service_name}/annotate/{storage_doc_id}'),
            ('post', '/{service_name}/process'), ('post', '/{service_name}/process/{storage_doc_id}'),
            ('get', '/{service_name}/status'), ('get', '/{service_name}/cancel'), ('post', '/{service_name}/cancel'),
            ('get', '/{page}'), ('head', '/{page}'), ('get', '/{service_name}/{page}'),
            ('get', '/{service_name}/service/{page}'), ('get', '/'), ('get', '/metrics'),
            ('get', '/openapi.json')} <= operations
    assert document['components']['schemas']['Error']['required'] == ['status', 'description', 'vesta']


def test_submissions_are_described_as_secured_and_status_is_not(gateway):
    paths = requests.get(f'{gateway.url}/openapi.json', timeout=10).json()['paths']
    assert paths['/{service_name}/annotate']['post']['security'] == [{'jwt': []}]
    assert 'security' not in paths['/{service_name}/status']['get']


def test_live_gateway_keeps_to_its_openapi_description(gateway, start_worker, settings_file, tmp_path):
    # One worker on every queue: a service no live worker runs answers stats with 503 (on purpose).
    start_worker(*load_settings(settings_file, {}).services)
    # Left out: the rules of a submission that a schema cannot state, so that a request it calls
    # valid may be refused and one it calls invalid accepted: doc_url or a storage id but not
    # both, and neither for a `noparams` service; a field in both the query and the body, where
    # the body's wins.
    checks = ['--checks', 'all', '--exclude-checks', 'positive_data_acceptance,negative_data_rejection']
    done = subprocess.run(
        [sys.executable, '-m', 'schemathesis.cli', 'run', f'{gateway.url}/openapi.json',
         '--header', f'Authorization: Bearer {token(expires_in=3600)}', *checks,
         '--max-examples', '100', '--seed', '1', '--workers', '1', '--generation-database', 'none', '--no-color',
         '--report', 'junit', '--report-dir', str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
