"""Random `adjective-noun` names for VMs: valid DNS labels, unique among what exists."""

from __future__ import annotations

import re
import secrets
from collections.abc import Container

from banger.errors import InvalidInputError

ADJECTIVES = (
    "agile amber bold brave brisk calm clever cosmic crisp curious daring deft eager early fancy fast fierce "
    "gentle glad golden grand happy hardy humble jolly keen kind lively lucky mellow merry mighty misty nimble "
    "noble plucky proud quick quiet rapid ready rustic shiny silent sleek snappy solid spry steady sunny swift "
    "tidy tiny vivid warm wise witty zesty"
).split()
NOUNS = (
    "badger beacon bison comet condor coral cricket falcon ferret fjord gecko glacier harbor heron ibis jackal "
    "kestrel koala lagoon lemur lynx marmot meadow meteor moose narwhal nebula ocelot otter panda pebble pelican "
    "puffin quasar raven reef robin salmon sparrow tapir tern tiger toucan walrus willow wombat yak zebra"
).split()

_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


def is_dns_label(name: str) -> bool:
    """True when `name` is a lowercase RFC 1123 label (letters, digits, inner hyphens, 1-63 chars)."""
    return bool(_LABEL.fullmatch(name))  # fullmatch: '$' would let a trailing newline through


def validate_name(name: str, what: str = "name") -> str:
    """Return `name` if it is a valid DNS label, else raise a clear error."""
    if not is_dns_label(name):
        raise InvalidInputError(f"invalid {what} {name!r}: use 1-63 lowercase letters, digits and inner hyphens")
    return name


def generate_name(taken: Container[str], attempts: int = 200) -> str:
    """A random adjective-noun not in `taken`; falls back to a numeric suffix when crowded."""
    for _ in range(attempts):
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}"
        if name not in taken:
            return name
    while True:
        name = f"{secrets.choice(ADJECTIVES)}-{secrets.choice(NOUNS)}-{secrets.randbelow(10_000)}"
        if name not in taken:
            return name
