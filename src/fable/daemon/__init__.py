"""fabled, the name service: ``registry`` (endpoints, flows, ownership rules), ``triggers`` (when
it reconfigures a flow on its own), ``server`` (the asyncio loop). The protocol it speaks with the
library is ``fable.nameservice``. ``python -m fable.daemon`` runs one."""
