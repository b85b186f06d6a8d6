"""The segments stage: contact profiles, friends and family, and event-message audiences.

Pure rules only, each (record + state) -> `profiles.Outcome` (new state, records to produce,
rejection reasons); `app.py` holds the faust agents around them. `rules` says which rule takes
which record; `profiles`, `family` and `audience` document their state shapes and choices.
"""
