import pytest

from controlnet import Family


@pytest.fixture(params=list(Family), ids=lambda f: f.value)
def family(request) -> Family:
    return request.param
