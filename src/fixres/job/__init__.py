"""The main job, ``fixres fix``: a table of resumable steps keyed on their inputs, the run's context, the
plan, and choosing the size on images the headline is not reported on."""
