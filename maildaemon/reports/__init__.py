"""Reports that arrive after the relay's 250: what one says (``parse``) and what it does to
the delivery it names (``effects``). Pure: no I/O, no store."""
