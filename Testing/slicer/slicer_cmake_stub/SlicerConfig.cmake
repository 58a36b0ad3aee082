# Stand-in for the CMake package of a Slicer 5.8 build, holding only what a scripted-module
# extension uses, so that Testing/slicer/test_extension_install.py can configure, build and install
# the real extension CMakeLists.txt without Slicer: cmake -DSlicer_DIR=<this folder> ...
# Names and values follow Slicer's CMake/SlicerConfig.cmake.in.
set(Slicer_CMAKE_DIR ${CMAKE_CURRENT_LIST_DIR})
set(CMAKE_MODULE_PATH ${Slicer_CMAKE_DIR} ${CMAKE_MODULE_PATH})

set(Slicer_USE_FILE ${Slicer_CMAKE_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${Slicer_CMAKE_DIR}/SlicerExtensionGenerateConfig.cmake)
set(Slicer_EXTENSION_CPACK ${Slicer_CMAKE_DIR}/SlicerExtensionCPack.cmake)

set(Slicer_USE_PYTHONQT ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.8/qt-scripted-modules)

# Slicer's own Python byte-compiles the scripts; here any Python 3 does.
if(NOT DEFINED PYTHON_EXECUTABLE)
  find_package(Python3 COMPONENTS Interpreter REQUIRED)
  set(PYTHON_EXECUTABLE ${Python3_EXECUTABLE})
endif()
