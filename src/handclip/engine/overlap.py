"""The guard against evaluating a model on people it was trained on.

A checkpoint records the subjects of every stage it descends from (``trained_subjects``); an
evaluation's test subjects are its queries and the gallery images that can match them. In
``gallery_<i>_all`` the other aspects' images are distractors (other identities by definition of
the published protocol), so they are not test subjects: a dorsal-right model trained on subject
1040 may meet 1040's left hand there, as in the published work.
"""
from __future__ import annotations

import sys
from typing import Sequence

from handclip.data.subjects import overlapping_subjects
from handclip.errors import UserError

NAMED_SUBJECTS = 5  # how many subjects a refusal names


def check_subject_overlap(encoders: Sequence, sources: Sequence[str], protocols: Sequence,
                          allow_overlap: bool) -> dict[str, dict]:
    """Refuse (``UserError``) when a model was trained on a test subject of a protocol, unless
    ``allow_overlap``. Returns, per protocol name, what its results must say ("subject_overlap":
    ``{"allowed": true, "subjects": N}``, and ``"unchecked": [...]`` for models without records);
    no entry for a clean protocol. Warns once on stderr about models without records."""
    unchecked = [source for encoder, source in zip(encoders, sources, strict=True)
                 if encoder.trained_subjects is None]
    if unchecked:
        print(f"handclip: warning: {', '.join(unchecked)}: no record of the subjects trained on (a checkpoint "
              f"of an older handclip), so nothing shows whether a test subject was trained on", file=sys.stderr)
    entries = {}
    for protocol in protocols:
        tested = tested_samples(protocol)
        found = {source: overlapping_subjects(encoder.trained_subjects, tested)
                 for encoder, source in zip(encoders, sources) if encoder.trained_subjects}
        found = {source: subjects for source, subjects in found.items() if subjects}
        subjects = sorted({subject for overlap in found.values() for subject in overlap})
        if subjects and not allow_overlap:
            named = ", ".join(f"{dataset} {subject}" for dataset, subject in subjects[:NAMED_SUBJECTS])
            more = ", ..." if len(subjects) > NAMED_SUBJECTS else ""
            raise UserError(f"{', '.join(found)}: trained on {len(subjects)} test subject(s) of {protocol.aspect} "
                            f"({named}{more}); results would be inflated; pass --allow-overlap to evaluate anyway")
        entry = {"allowed": True, "subjects": len(subjects)} if subjects else {}
        if unchecked:
            entry["unchecked"] = list(unchecked)
        if entry:
            entries[protocol.name] = entry
    return entries


def tested_samples(protocol) -> list:
    """Every query, and the gallery images that can be a query's true match (all of them, but
    in a gallery-all protocol only those of the queries' aspects)."""
    queries = [s for group in protocol.queries for s in group]
    gallery = [s for group in protocol.galleries for s in group]
    if protocol.match_on_aspect:
        query_aspects = {s.aspect for s in queries}
        gallery = [s for s in gallery if s.aspect in query_aspects]
    return queries + gallery
