"""Values only, no asyncio: kinds, errors, envelopes, the report, policies, options, seams."""
