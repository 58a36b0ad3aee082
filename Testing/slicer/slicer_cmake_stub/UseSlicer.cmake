# Stand-in for Slicer's UseSlicer.cmake: the macros a scripted-module extension calls.
if(NOT DEFINED BUILD_TESTING)
  set(BUILD_TESTING ON)
endif()
include(ctkMacroCompilePythonScript)
include(SlicerMacroBuildScriptedModule)
include(SlicerMacroPythonTesting)
