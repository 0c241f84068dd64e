"""JWT on submit and cancel (SPEC section 4): anything but a valid token is 401, code 208."""

import base64
import json
import re

import jwt
import pytest
import requests

from conftest import AUDIENCE, SECRET, token


def unsigned_token():
    """A token with ``alg: none``: a valid payload and no signature."""
    def part(document):
        return base64.urlsafe_b64encode(json.dumps(document).encode()).rstrip(b'=').decode()
    return f'{part({"alg": "none", "typ": "JWT"})}.{part({"aud": AUDIENCE, "exp": 2**40})}.'


# Each case: the Authorization header (made when the test runs) and what the refusal says.
REFUSED = {
    'no header': (lambda: None, 'missing Authorization header'),
    'garbage': (lambda: 'Bearer not.a.token', 'Not enough segments|Invalid header'),
    'empty bearer': (lambda: 'Bearer ', 'missing Authorization header'),
    'wrong signature': (lambda: token(secret='another-secret-of-sixty-four-bytes-' + 'x' * 29),
                        'Signature verification failed'),
    'wrong audience': (lambda: token(audience='someone-else'), 'Audience'),
    'expired': (lambda: token(expires_in=-60), 'expired'),
    'no expiry': (lambda: jwt.encode({'aud': AUDIENCE}, SECRET, algorithm='HS256'), '"exp"'),
    'alg none': (unsigned_token, 'alg value is not allowed'),
    'other HS algorithm': (lambda: token(algorithm='HS512'), 'alg value is not allowed'),
}


# Each route that needs a token: its path and what it is sent.
GUARDED = {
    'annotate': ('annotate', {'data': {'doc_url': 'http://127.0.0.1:9/a.wav'}}),
    'process': ('process', {'json': {'doc_url': 'http://127.0.0.1:9/a.wav'}}),
    'cancel': ('cancel', {'params': {'uuid': '00000000-0000-4000-8000-000000000000'}}),
}


@pytest.mark.parametrize('route', GUARDED)
@pytest.mark.parametrize('case', REFUSED)
def test_request_without_a_valid_token_is_refused_with_208(gateway, case, route):
    header, reason = REFUSED[case]
    path, body = GUARDED[route]
    headers = {'Authorization': header()} if header() is not None else {}
    answer = requests.post(f'{gateway.url}/echo/{path}', headers=headers, timeout=10, **body)
    assert answer.status_code == 401
    assert answer.json()['vesta']['code'] == 208
    assert re.search(reason, answer.json()['vesta']['message']), answer.json()
    assert answer.headers['WWW-Authenticate'] == 'Bearer'


def test_bare_token_without_bearer_is_accepted(gateway):
    answer = requests.post(f'{gateway.url}/echo/annotate', data={'doc_url': 'http://127.0.0.1:9/a.wav'},
                           headers={'Authorization': token()}, timeout=10)
    assert answer.status_code == 202


def test_token_expired_within_the_leeway_is_accepted(gateway):
    answer = gateway.submit('echo', data={'doc_url': 'http://127.0.0.1:9/a.wav'},
                            headers={'Authorization': token(expires_in=-5)})
    assert answer.status_code == 202


def test_status_needs_no_token(gateway):
    uuid = gateway.submitted('echo', doc_url='http://127.0.0.1:9/a.wav')
    assert requests.get(f'{gateway.url}/echo/status', params={'uuid': uuid}, timeout=10).status_code == 200


def test_refused_submission_queues_nothing(gateway, redis_db):
    requests.post(f'{gateway.url}/echo/annotate', data={'doc_url': 'http://127.0.0.1:9/a.wav'}, timeout=10)
    assert redis_db.llen('rq:queue:echo') == 0
