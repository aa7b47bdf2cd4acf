"""Exceptions cross Ray by pickle: every exception class defined in pipeline/ and actors/ comes back from
pickle (and Ray's cloudpickle) with its type, message and attributes. Python's default rebuilds an
exception as cls(*e.args), which breaks for a constructor that takes anything but its message
(ConfigError(key, value, reason)): those classes define __reduce__."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil

import pytest
from ray import cloudpickle

import actors
import pipeline


def _exception_classes() -> list[type[BaseException]]:
    found = {}
    for package in (pipeline, actors):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            module = importlib.import_module(info.name)
            for _, cls in inspect.getmembers(module, inspect.isclass):
                if issubclass(cls, BaseException) and cls.__module__ == module.__name__:
                    found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return [found[k] for k in sorted(found)]


EXCEPTIONS = _exception_classes()


def _instance(cls: type[BaseException]) -> BaseException:
    """cls built with a distinct string for each required argument of its constructor."""
    if cls.__init__ is BaseException.__init__:
        return cls("one line of message")
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    required = [p for p in params if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
    return cls(*(f"<{p.name}>" for p in required))


def test_the_classes_that_cross_ray_are_found():
    names = {cls.__name__ for cls in EXCEPTIONS}
    assert {"ConfigError", "ManifestError", "StorageError", "ObjectNotFound", "WorkerLost"} <= names


@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda cls: cls.__name__)
def test_round_trip_keeps_type_message_and_attributes(cls, dumps):
    e = _instance(cls)
    back = pickle.loads(dumps(e))
    assert type(back) is cls
    assert str(back) == str(e) and back.args == e.args
    assert vars(back) == vars(e)


def test_config_and_manifest_errors_keep_their_fields():
    from pipeline.config import ConfigError
    from pipeline.manifest import ManifestError

    e = pickle.loads(pickle.dumps(ConfigError("video.fps", 0, "must be > 0")))
    assert (e.key, e.value, e.reason, str(e)) == ("video.fps", 0, "must be > 0", "video.fps: must be > 0 (got 0)")
    e = pickle.loads(pickle.dumps(ManifestError("batch.jsonl", 3, "video.shots.0.seconds", 0, "must be > 0")))
    assert str(e) == "batch.jsonl:3: video.shots.0.seconds: must be > 0 (got 0)"
    assert (e.source, e.line, e.key, e.value) == ("batch.jsonl", 3, "video.shots.0.seconds", 0)
