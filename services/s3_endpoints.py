"""S3 endpoint resolution once per bucket, not once per object.

botocore resolves every call's endpoint by evaluating S3's endpoint ruleset over the call's
parameters, behind an LRU cache keyed on all of them. S3's ruleset declares ``Key``, ``Prefix``
and ``CopySource`` as parameters, so each new object key misses the cache and the whole ruleset
is evaluated again: about 40 % of the client CPU a small PUT costs (botocore issue #3528; fixed
upstream after the botocore that aioboto3 pins). No rule reads those three, so the endpoint
cannot depend on them. ``memoize_endpoint_resolution(client)`` puts a thin provider in front of
the client's own: it passes on only the parameters some rule of the ruleset references (found by
``referenced_parameters``, a pure walk over the rules) and lets botocore's cache do the rest, so
the answer is the one botocore would give, computed once per bucket and region. It reaches one
private attribute (``_ruleset_resolver._provider``); where that is not as expected, the client
is left as it is and the function says so by returning False. Nothing is opened or closed here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

# "{Bucket}" or "{Bucket#path}" inside a template string of the ruleset
_TEMPLATE_REFERENCE = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)[}#]")


def referenced_parameters(rules: Iterable[Any]) -> frozenset[str]:
    """Every name a rule reads, as ``{"ref": name}`` or in a ``{name}`` template, walking the
    raw JSON of the rules or botocore's rule objects (their attributes) alike."""
    found: set[str] = set()
    pending: list[Any] = list(rules)
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            found.update(_TEMPLATE_REFERENCE.findall(node))
        elif isinstance(node, Mapping):
            reference = node.get("ref")
            if isinstance(reference, str):
                found.add(reference)
            pending.extend(node.values())
        elif isinstance(node, list | tuple):
            pending.extend(node)
        elif hasattr(node, "__dict__"):
            pending.extend(vars(node).values())
    return frozenset(found)


class ReferencedParametersProvider:
    """An endpoint provider that hands the wrapped one only the parameters its rules read."""

    def __init__(self, provider: Any, referenced: frozenset[str]) -> None:
        self._provider = provider
        self.referenced = referenced

    def resolve_endpoint(self, **parameters: Any) -> Any:
        """The wrapped provider's answer, with the parameters no rule reads left out."""
        kept = {name: value for name, value in parameters.items() if name in self.referenced}
        return self._provider.resolve_endpoint(**kept)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)


def memoize_endpoint_resolution(client: Any) -> bool:
    """Front the client's endpoint provider with ``ReferencedParametersProvider``; False (and
    the client unchanged) when the client has no ruleset provider of the expected shape."""
    resolver = getattr(client, "_ruleset_resolver", None)
    provider = getattr(resolver, "_provider", None)
    if isinstance(provider, ReferencedParametersProvider):
        return True
    ruleset = getattr(provider, "ruleset", None)
    rules, parameters = getattr(ruleset, "rules", None), getattr(ruleset, "parameters", None)
    if not callable(getattr(provider, "resolve_endpoint", None)) or not rules or not parameters:
        return False
    referenced = referenced_parameters(rules)
    if not referenced & set(parameters):
        return False  # a ruleset this walk cannot read: leave it to botocore
    resolver._provider = ReferencedParametersProvider(provider, referenced)  # type: ignore[union-attr]
    return True
