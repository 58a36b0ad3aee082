# Stand-in for Slicer's CMake/SlicerMacroBuildScriptedModule.cmake: the same arguments and checks
# (every script and resource must exist), then the same ctkMacroCompilePythonScript call, which
# copies the module into <build>/${Slicer_QTSCRIPTEDMODULES_LIB_DIR} and installs that folder's
# content into ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}. Generic tests need the Slicer
# application and are not registered.
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER
    "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE"
    "NAME"
    "SCRIPTS;RESOURCES"
    ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords given to slicerMacroBuildScriptedModule(): \"${MY_SLICER_UNPARSED_ARGUMENTS}\"")
  endif()
  if(NOT DEFINED MY_SLICER_NAME)
    message(FATAL_ERROR "NAME is mandatory")
  endif()
  foreach(var SCRIPTS RESOURCES)
    foreach(value ${MY_SLICER_${var}})
      if(NOT IS_ABSOLUTE ${value})
        set(value ${CMAKE_CURRENT_SOURCE_DIR}/${value})
      endif()
      if(NOT EXISTS ${value} AND NOT EXISTS ${value}.py)
        message(FATAL_ERROR
          "slicerMacroBuildScriptedModule(${var}) given nonexistent file or directory '${value}'")
      endif()
    endforeach()
  endforeach()
  if(NOT Slicer_USE_PYTHONQT)
    message(FATAL_ERROR
      "Attempting to build the Python scripted module '${MY_SLICER_NAME}' when Slicer_USE_PYTHONQT is OFF")
  endif()

  set(_no_install_subdir_option NO_INSTALL_SUBDIR)
  set(_destination_subdir "")
  if(MY_SLICER_WITH_SUBDIR)
    get_filename_component(_destination_subdir ${CMAKE_CURRENT_SOURCE_DIR} NAME)
    set(_destination_subdir "/${_destination_subdir}")
    set(_no_install_subdir_option "")
  endif()

  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}${_destination_subdir}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    ${_no_install_subdir_option}
    )
endmacro()
