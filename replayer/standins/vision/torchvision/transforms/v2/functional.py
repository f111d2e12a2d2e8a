# Imported as `tvF` by transformers' image processors; no attribute is read at import.
