"""qmp: the QEMU Machine Protocol server of `appliance run` (qemu.qmp clients work against it).

Public API::

    QmpServer(machine, pretty=False)        (appliance.qmp.server)
        await listen_unix(path) / listen_tcp(host, port) / connect(chardev)
        emit(event, data) ; await close()
    QmpSpec(chardev, pretty=False)          a machine DeviceSpec: `-qmp`, `-mon`
    COMMANDS, command(name, args)           (appliance.qmp.commands) the command table
"""
