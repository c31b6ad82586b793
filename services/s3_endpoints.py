"""S3 endpoint resolution once per bucket, not once per object.

botocore resolves every call's endpoint in two steps: it builds the ruleset's parameters from
the call (about 17 of them, each looked up in the operation's static and per-call context, the
client's context and the builtins), then evaluates S3's endpoint ruleset over them behind an
LRU cache keyed on all of them. S3's ruleset declares ``Key``, ``Prefix`` and ``CopySource`` as
parameters, so each new object key misses that cache and the whole ruleset is evaluated again
(botocore issue #3528; fixed upstream after the botocore that aioboto3 pins); even a hit pays
for building the parameters. In a profile of a plain aioboto3 PUT loop the evaluation was ~18%
of the client CPU and building the parameters another ~5%.

No rule reads those three parameters (``referenced_parameters``, a pure walk over the rules,
finds every name a rule reads), so the endpoint cannot depend on them. ``EndpointMemo`` sits in
front of the resolver's ``construct_endpoint`` and keeps its answer per ``EndpointMemo.key``:
the operation's name, the call arguments that feed a referenced parameter (for S3: the bucket)
and the referenced builtins *after* the ``before-endpoint-resolution`` handlers have adjusted
them for this call (the region a redirect cached for the bucket, path style for a bucket name
that is no host label). Everything else that goes into the parameters is fixed per client or
per operation. A call the key cannot describe (an operation whose parameters come from a
JMESPath over its arguments, a builtin that is resolved lazily, an unhashable value) goes to
botocore unchanged, as does every first call per key; what is kept is botocore's own answer.

``memoize_endpoint_resolution(client)`` installs it. It reaches aiobotocore's private resolver
(``_ruleset_resolver``: ``construct_endpoint``, ``_get_customized_builtins``,
``_param_definitions``); where those are not as expected, the client is left as it is and the
function says so by returning False. Nothing is opened or closed here.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, Final

# "{Bucket}" or "{Bucket#path}" inside a template string of the ruleset
_TEMPLATE_REFERENCE = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)[}#]")

# Answers kept per client: one per operation and bucket in practice, so this bound is never
# reached by the layer cache; it only keeps a client used on endless buckets from growing.
MAX_REMEMBERED_ENDPOINTS: Final = 1024


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


class EndpointMemo:
    """``construct_endpoint`` of one client's ruleset resolver, answered once per key."""

    def __init__(self, resolver: Any, referenced: frozenset[str]) -> None:
        self.construct_endpoint = resolver.construct_endpoint  # botocore's own, for misses
        self._customized_builtins = resolver._get_customized_builtins
        self.referenced = referenced
        self._referenced_builtins = tuple(
            definition.builtin
            for name, definition in resolver._param_definitions.items()
            if name in referenced and definition.builtin is not None
        )
        self._answers: dict[Hashable, Any] = {}

    def key(
        self, operation_model: Any, call_args: Mapping[str, Any], builtins: Mapping[str, Any]
    ) -> Hashable | None:
        """What the endpoint of this call depends on, or None when that cannot be said."""
        if operation_model.operation_context_parameters:
            return None
        arguments = tuple(
            call_args.get(parameter.member_name)
            for parameter in operation_model.context_parameters
            if parameter.name in self.referenced
        )
        values = tuple(builtins.get(name) for name in self._referenced_builtins)
        if any(callable(value) for value in values):
            return None
        key = (operation_model.name, arguments, values)
        try:
            hash(key)
        except TypeError:
            return None
        return key

    async def __call__(
        self, operation_model: Any, call_args: Mapping[str, Any] | None, request_context: Any
    ) -> Any:
        arguments = call_args or {}
        builtins = await self._customized_builtins(
            operation_model, arguments, request_context or {}
        )
        key = self.key(operation_model, arguments, builtins)
        answer = self._answers.get(key) if key is not None else None
        if answer is None:
            answer = await self.construct_endpoint(operation_model, call_args, request_context)
            if key is not None and len(self._answers) < MAX_REMEMBERED_ENDPOINTS:
                self._answers[key] = answer
        # botocore hands each call its own headers dict; the rest of the answer is read only.
        return answer._replace(headers=dict(answer.headers))


def memoize_endpoint_resolution(client: Any) -> bool:
    """Put ``EndpointMemo`` in front of the client's endpoint resolution; False (and the
    client unchanged) when the client has no ruleset resolver of the expected shape."""
    resolver = getattr(client, "_ruleset_resolver", None)
    if isinstance(getattr(resolver, "construct_endpoint", None), EndpointMemo):
        return True
    ruleset = getattr(getattr(resolver, "_provider", None), "ruleset", None)
    rules, parameters = getattr(ruleset, "rules", None), getattr(ruleset, "parameters", None)
    definitions = getattr(resolver, "_param_definitions", None)
    if (
        not rules
        or not parameters
        or not isinstance(definitions, Mapping)
        or not callable(getattr(resolver, "construct_endpoint", None))
        or not callable(getattr(resolver, "_get_customized_builtins", None))
    ):
        return False
    referenced = referenced_parameters(rules)
    if not referenced & set(parameters):
        return False  # a ruleset this walk cannot read: leave it to botocore
    resolver.construct_endpoint = EndpointMemo(resolver, referenced)  # type: ignore[union-attr]
    return True
