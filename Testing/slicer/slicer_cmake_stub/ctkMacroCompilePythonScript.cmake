# Stand-in for CTK's CMake/ctkMacroCompilePythonScript.cmake, emulating what it does to files:
#  - each script (".py" appended when missing) and resource keeps its path relative to SOURCE_DIR
#    (default: the calling folder) and is copied at build time to DESTINATION_DIR/<that path>;
#  - the copied scripts are byte-compiled to <script>.pyc beside them; a syntax error fails the build;
#  - install(DIRECTORY) copies the whole DESTINATION_DIR into INSTALL_DIR: the folder itself, or,
#    with NO_INSTALL_SUBDIR, its content.
set(_ctk_stub_dir ${CMAKE_CURRENT_LIST_DIR})

function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(MY
    "NO_INSTALL_SUBDIR;GLOBAL_TARGET"
    "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR"
    "SCRIPTS;RESOURCES"
    ${ARGN})
  foreach(varname TARGET_NAME SCRIPTS DESTINATION_DIR INSTALL_DIR)
    if(NOT DEFINED MY_${varname})
      message(FATAL_ERROR "${varname} is mandatory")
    endif()
  endforeach()
  if(NOT DEFINED MY_SOURCE_DIR)
    set(MY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  get_filename_component(MY_SOURCE_DIR ${MY_SOURCE_DIR} REALPATH)
  get_filename_component(MY_DESTINATION_DIR ${MY_DESTINATION_DIR} REALPATH)
  set(target ${MY_TARGET_NAME})

  set(copied_scripts)
  foreach(file ${MY_SCRIPTS})
    get_filename_component(file_ext ${file} EXT)
    if(NOT "${file_ext}" MATCHES "py")
      set(file "${file}.py")
    endif()
    if(IS_ABSOLUTE ${file})
      set(src ${file})
      file(RELATIVE_PATH file ${CMAKE_CURRENT_BINARY_DIR} ${src})
    else()
      set(src ${MY_SOURCE_DIR}/${file})
    endif()
    _ctk_stub_copy(${src} ${MY_DESTINATION_DIR}/${file} "Copying python Script: ${file}")
    list(APPEND copied_scripts ${MY_DESTINATION_DIR}/${file})
  endforeach()
  add_custom_target(Copy${target}PythonScriptFiles ALL DEPENDS ${copied_scripts})

  set(copied_resources)
  foreach(file ${MY_RESOURCES})
    if(IS_ABSOLUTE ${file})
      set(src ${file})
    else()
      set(src ${MY_SOURCE_DIR}/${file})
    endif()
    _ctk_stub_copy(${src} ${MY_DESTINATION_DIR}/${file} "Copying python Resource: ${file}")
    list(APPEND copied_resources ${MY_DESTINATION_DIR}/${file})
  endforeach()
  if(copied_resources)
    add_custom_target(Copy${target}PythonResourceFiles ALL DEPENDS ${copied_resources})
  endif()

  set(stamp ${CMAKE_CURRENT_BINARY_DIR}/python_compile_${target}_complete)
  add_custom_command(
    OUTPUT ${stamp}
    COMMAND ${PYTHON_EXECUTABLE} ${_ctk_stub_dir}/ctk_compile_python_scripts.py ${stamp} ${copied_scripts}
    DEPENDS Copy${target}PythonScriptFiles
    COMMENT "Compiling python scripts: ${target}")
  add_custom_target(Compile${target}PythonFiles ALL DEPENDS ${stamp})

  set(directory_to_install ${MY_DESTINATION_DIR})
  if(MY_NO_INSTALL_SUBDIR)
    set(directory_to_install ${MY_DESTINATION_DIR}/)
  endif()
  install(DIRECTORY "${directory_to_install}"
    DESTINATION "${MY_INSTALL_DIR}" COMPONENT RuntimeLibraries
    USE_SOURCE_PERMISSIONS)
endfunction()

function(_ctk_stub_copy src tgt comment)
  add_custom_command(
    OUTPUT ${tgt}
    COMMAND ${CMAKE_COMMAND} -E copy ${src} ${tgt}
    DEPENDS ${src}
    COMMENT "${comment}")
endfunction()
