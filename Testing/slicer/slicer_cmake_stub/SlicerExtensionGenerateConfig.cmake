# Stand-in: Slicer writes the extension's <Name>Config.cmake here; nothing to check without Slicer.
