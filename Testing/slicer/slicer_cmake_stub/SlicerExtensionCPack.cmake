# Stand-in: Slicer configures CPack for the extension package here; `cmake --install` is enough.
