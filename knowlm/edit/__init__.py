"""Knowledge editing (KnowLM's second pillar), in EasyEdit's terms.

- ``requests``: edit requests in EasyEdit's format (prompt, subject, target_new, rephrases, locality, portability),
  checked, each failure one line naming the request.
- ``evaluate``: EasyEdit's scores (token accuracy of a target under teacher forcing): reliability, generalization,
  locality (against the unedited model's own predictions), portability.
"""
