"""The report of a ``fixres fix`` run: the HTML page, its figures and the part on choosing the served size."""
