"""fabled, the name service: ``protocol`` (frames, names, socket paths), ``registry`` (endpoints,
flows, ownership rules), ``server`` (the asyncio loop). ``python -m fable.daemon`` runs one."""
