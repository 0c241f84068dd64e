"""The CANARIE registry API (SPEC section 7) of the gateway and of each service."""

import os
import re
import signal
from datetime import datetime
from pathlib import Path

import pytest
import requests

from conftest import ECHO_NOTES, ROOT, gateway_on, wait_until, write_settings

JSON = {'Accept': 'application/json'}
FIELDS = {'name', 'synopsis', 'version', 'institution', 'releaseTime', 'researchSubject', 'supportEmail',
          'category', 'tags'}
PAGES = ('info', 'stats', 'doc', 'releasenotes', 'support', 'source', 'tryme', 'licence', 'provenance')


def get(gateway, path, **kwargs):
    return requests.get(f'{gateway.url}{path}', timeout=10, allow_redirects=False, **kwargs)


def test_platform_info_has_exactly_the_canarie_fields(gateway):
    info = get(gateway, '/info', headers=JSON).json()
    assert set(info) == FIELDS
    assert info['name'] == 'Service Gateway under test' and info['tags'] == ['one', 'two words']
    assert datetime.strptime(info['releaseTime'], '%Y-%m-%dT%H:%M:%SZ')


@pytest.mark.parametrize('path', ['/echo/info', '/echo/service/info'])
def test_service_info_adds_its_live_workers(gateway, start_worker, path):
    start_worker('echo')
    start_worker('echo', 'crash')
    info = get(gateway, path, headers=JSON).json()
    assert set(info) == FIELDS | {'activeWorkers'}
    assert info['activeWorkers'] == 2
    assert (info['name'], info['version'], info['institution']) == ('Echo', '1.0.0', 'Test institute')


def test_killed_worker_stops_counting_once_its_heartbeat_expires(gateway, start_worker):
    start_worker('echo')
    killed = start_worker('echo')
    assert get(gateway, '/echo/info', headers=JSON).json()['activeWorkers'] == 2
    os.kill(killed.pid, signal.SIGKILL)
    wait_until(lambda: get(gateway, '/echo/info', headers=JSON).json()['activeWorkers'] == 1, timeout=30,
               interval=0.5, message='the killed worker to stop counting (worker_ttl = 20 s)')


@pytest.mark.parametrize('accept', [None, '*/*', 'text/html', 'text/html,application/xhtml+xml,*/*;q=0.8'])
@pytest.mark.parametrize('page', ['info', 'stats'])
def test_info_and_stats_are_html_unless_json_is_asked_for(gateway, accept, page):
    answer = get(gateway, f'/{page}', headers={'Accept': accept} if accept else {})
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('text/html')
    assert '<table' in answer.text


@pytest.mark.parametrize('accept', ['application/json', 'application/json, */*',
                                    'application/json, text/plain, */*', 'text/html;q=0.5, application/json'])
@pytest.mark.parametrize('page', ['info', 'stats'])
def test_info_and_stats_are_json_when_json_is_named(gateway, accept, page):
    answer = get(gateway, f'/{page}', headers={'Accept': accept})
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('application/json')
    assert answer.json()


def test_stats_count_submissions_per_service_and_in_total(gateway, redis_db, start_worker):
    start_worker('echo', 'crash')
    for service in ('echo', 'echo', 'crash'):
        gateway.submitted(service, doc_url='http://127.0.0.1:9/a.wav')
    assert get(gateway, '/echo/stats', headers=JSON).json()['invocations'] == 2
    assert get(gateway, '/crash/service/stats', headers=JSON).json()['invocations'] == 1
    stats = get(gateway, '/stats', headers=JSON).json()
    assert stats['invocations'] == 3 and datetime.strptime(stats['lastReset'], '%Y-%m-%dT%H:%M:%SZ')


def test_stats_survive_a_gateway_restart(gateway, settings_file, redis_server, redis_db, start_worker):
    start_worker('echo')
    gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    before = get(gateway, '/echo/stats', headers=JSON).json()
    with gateway_on(settings_file, redis_server) as restarted:
        after = get(restarted, '/echo/stats', headers=JSON).json()
    assert after == before == {'invocations': 1, 'lastReset': before['lastReset']}


def test_service_stats_answer_503_when_no_live_worker_runs_it(gateway, redis_db):
    answer = get(gateway, '/echo/stats', headers=JSON)
    assert answer.status_code == 503 and answer.json()['vesta']['code'] == 205
    assert get(gateway, '/stats', headers=JSON).status_code == 200  # the gateway itself is up


def test_stats_answer_503_when_redis_is_down(gateway, stopped_redis):
    answer = get(gateway, '/stats', headers=JSON)
    assert answer.status_code == 503 and answer.json()['vesta']['code'] == 205


def test_page_set_to_a_url_redirects(gateway):
    answer = get(gateway, '/doc')
    assert answer.status_code in (302, 303) and answer.headers['Location'] == 'https://example.org/gateway-doc'


def test_page_set_to_a_file_is_rendered(gateway):
    answer = get(gateway, '/echo/doc')
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('text/html')
    assert '<h1>Echo</h1>' in answer.text and '<strong>received</strong>' in answer.text


def test_page_file_that_is_a_whole_html_document_is_served_as_it_is(gateway):
    answer = get(gateway, '/echo/releasenotes')
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('text/html')
    assert answer.text == ECHO_NOTES


def test_page_set_to_text_and_status_answers_them(gateway):
    support, tryme = get(gateway, '/support'), get(gateway, '/tryme')
    assert (support.status_code, support.text) == (200, 'Write to tests@example.org')
    assert (tryme.status_code, tryme.text) == (404, 'Not here')


def test_source_with_nothing_configured_is_204(gateway):
    assert get(gateway, '/source').status_code == 204
    assert get(gateway, '/echo/source').status_code == 204


def test_other_page_with_nothing_configured_is_204(gateway, redis_server, tmp_path, web):
    settings = write_settings(tmp_path / 'settings.ini', web, gateway={'provenance': None})
    with gateway_on(settings, redis_server) as without_provenance:
        assert get(without_provenance, '/provenance').status_code == 204


def test_negotiated_answers_vary_on_accept(gateway):
    assert get(gateway, '/info').headers['Vary'] == 'Accept'


def test_service_without_a_page_of_its_own_has_the_gateways(gateway):
    assert get(gateway, '/crash/doc').headers['Location'] == 'https://example.org/gateway-doc'


@pytest.mark.parametrize('prefix', ['', '/echo', '/echo/service'])
@pytest.mark.parametrize('page', PAGES)
def test_every_page_answers_head_as_it_answers_get(gateway, start_worker, page, prefix):
    if prefix and page == 'stats':
        start_worker('echo')  # a service no live worker runs answers stats with 503
    head = requests.head(f'{gateway.url}{prefix}/{page}', timeout=10, allow_redirects=False)
    got = get(gateway, f'{prefix}/{page}')
    assert head.status_code == got.status_code
    assert {key: head.headers.get(key) for key in ('Content-Type', 'Location')} == {
        key: got.headers.get(key) for key in ('Content-Type', 'Location')}


def test_head_of_stats_answers_503_when_redis_is_down(gateway, stopped_redis):
    assert requests.head(f'{gateway.url}/stats', timeout=10).status_code == 503


def test_unknown_service_pages_are_404_202(gateway):
    answer = get(gateway, '/nosuch/info')
    assert answer.status_code == 404 and answer.json()['vesta']['code'] == 202


@pytest.fixture(scope='module')
def shipped_gateway(redis_server):
    with gateway_on(ROOT / 'settings.ini', redis_server) as gateway:
        yield gateway


@pytest.mark.parametrize('prefix', ['', '/annotator'])
@pytest.mark.parametrize('page', ['doc', 'releasenotes', 'support', 'tryme', 'licence', 'provenance'])
def test_shipped_pages_render(shipped_gateway, prefix, page):
    answer = get(shipped_gateway, f'{prefix}/{page}')
    assert answer.status_code == 200 and answer.headers['Content-Type'].startswith('text/html')
    assert '<h1>' in answer.text


def test_shipped_source_is_204(shipped_gateway):
    assert get(shipped_gateway, '/source').status_code == 204


def test_licence_page_lists_every_pinned_dependency():
    licence = (ROOT / 'docs/gateway/licence.md').read_text().lower()
    rows = {(name, version) for name, version in re.findall(r'^\|\s*([\w.\[\]-]+?)\s*\|\s*([\w.]+)\s*\|', licence,
                                                           flags=re.MULTILINE)}
    pinned = re.findall(r'^([\w.-]+)(?:\[\w+\])?==([\w.]+)', (ROOT / 'requirements.txt').read_text(), re.MULTILINE)
    missing = [f'{name}=={version}' for name, version in pinned if (name.lower(), version) not in rows]
    assert not missing, f'docs/gateway/licence.md lacks {missing}'


def test_shipped_page_files_exist():
    for path in re.findall(r'^(?:doc|releasenotes|support|tryme|licence|provenance)\s*=\s*(\S+\.md)\s*$',
                           (ROOT / 'settings.ini').read_text(), re.MULTILINE):
        assert Path(ROOT, path).is_file(), path
