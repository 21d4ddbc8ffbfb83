"""The feedback store, torch-free: tables, migrations' models, service functions by domain, pairs, export.

Service functions live in one module per domain, imported as
`from feedback.store import prompts as prompts_service`: prompts, responses, history, images,
reactions, consent, deletion, runs, adapters, stats, canary. Every service function takes an
`AsyncSession` with no transaction open, and keyword arguments only; it runs one transaction and
commits it, or raises a `feedback.store.errors.FeedbackError` (or lets a
database error through) having written nothing. Results are frozen dataclasses, never ORM
objects, so nothing lazy-loads after the session is gone.

Privacy rules, in one place:
- Prompts and answers are always stored (follow-ups, 🔁 and 🗑️ need them); a prompt is
  `trainable` only if its guild had learning on and its author had not opted out when it was
  recorded, and never in a DM. Each history turn records its source (the prompt or response it
  quotes, and that source's author and guild). Pair building checks the guild and the users
  again, for the prompt and for every quoted turn (feedback.store.eligibility).
- Votes of opted-out or forgotten users are not stored from then on (their earlier votes stay
  stored while opted out, but never reach training; forgetting deletes them).
- Deleting takes along everything that carries the deleted content: a prompt takes its answers,
  their messages and votes, the pairs runs recorded with them, its images once no other prompt
  uses them (rows and files), and every prompt whose history quotes it or its answers (a reply
  to the answer or to the question, someone else's too: the whole follow-up is deleted, not
  scrubbed, since its answers were written from the quoted words); an answer takes its messages,
  votes and the prompts quoting it, and an /ask question left without answers. Forget-me also
  finds quotes by their recorded author. Channel and thread deletions, and removal from a guild
  (after SMOLCORD_GUILD_GRACE_DAYS), delete the same way. Children are deleted explicitly (not
  only through ON DELETE CASCADE), so a connection without foreign keys enforced cannot leave
  orphans.
"""
