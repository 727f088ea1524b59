import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from streamproc import topics
from streamproc.cli.main import main
from streamproc.errors import ConfigError

pytestmark = pytest.mark.kafka


def fresh_specs() -> list[topics.TopicSpec]:
    suffix = uuid.uuid4().hex[:8]
    return topics.suffixed(topics.load_specs(), suffix)


def test_the_declarations_name_every_role() -> None:
    names = topics.topic_names(topics.load_specs())
    assert names.requests == ("streamproc.requests.high", "streamproc.requests.default")
    assert names.responses == "streamproc.responses"
    assert names.dead_letter == "streamproc.dead-letter"
    assert names.status == "streamproc.status"


async def test_apply_creates_once_then_is_idempotent(bootstrap: str) -> None:
    specs = fresh_specs()
    first = await topics.apply(bootstrap, specs)
    assert sorted(first.created) == sorted(s.name for s in specs)
    second = await topics.apply(bootstrap, specs)
    assert second.created == []
    assert sorted(second.unchanged) == sorted(s.name for s in specs)
    assert second.drift == []


async def test_apply_reports_drift_without_changing_anything(bootstrap: str) -> None:
    specs = fresh_specs()
    await topics.apply(bootstrap, specs)
    changed = [replace(specs[0], partitions=9, config={"retention.ms": "1000"}), *specs[1:]]
    report = await topics.apply(bootstrap, changed)
    assert f"{specs[0].name}: 4 partitions, declared 9" in report.drift
    assert f"{specs[0].name}: retention.ms=86400000, declared 1000" in report.drift
    assert (await topics.apply(bootstrap, specs)).drift == []  # the topic was left alone


def test_cli_apply_exits_nonzero_on_drift(bootstrap: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    name = f"drift-{uuid.uuid4().hex[:8]}"
    declared = tmp_path / "t.toml"
    declared.write_text(f'[[topic]]\nname = "{name}"\nrole = "requests"\npartitions = 2\n')
    assert main(["topics", "apply", "--bootstrap", bootstrap, "--dir", str(tmp_path)]) == 0
    assert f"created   {name}" in capsys.readouterr().out
    declared.write_text(f'[[topic]]\nname = "{name}"\nrole = "requests"\npartitions = 3\n')
    assert main(["topics", "apply", "--bootstrap", bootstrap, "--dir", str(tmp_path)]) == 1
    assert "2 partitions, declared 3" in capsys.readouterr().out


def test_bad_declarations_are_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "t.toml").write_text('[[topic]]\nname = "x"\nrole = "nonsense"\npartitions = 1\n')
    with pytest.raises(ConfigError, match="unknown role"):
        topics.load_specs(tmp_path)
    (tmp_path / "t.toml").write_text('[[topic]]\nname = "x"\nrole = "requests"\n')
    with pytest.raises(ConfigError, match="partitions"):
        topics.load_specs(tmp_path)
