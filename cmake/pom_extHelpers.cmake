# Helpers shared by pom_ext's own build (CMakeLists.txt) and its installed package (pom_extConfig.cmake).

# pom_ext_hint_cuda_toolkit(): before find_package(Torch) with a CUDA build of torch. torch's CMake looks for the
# CUDA toolkit next to the first nvcc on PATH, which a wrapper script (e.g. /usr/local/bin/nvcc) defeats, and for
# libnvrtc.so, which a pip-installed torch keeps in site-packages/nvidia/<cuda>/lib under a versioned name only.
# This points CUDA_TOOLKIT_ROOT_DIR / CUDAToolkit_ROOT / CMAKE_CUDA_COMPILER at a real toolkit (CUDA_HOME,
# CUDA_PATH, the directory of nvcc, /usr/local/cuda, /usr/local/cuda-*) and CUDA_nvrtc_LIBRARY at that library,
# unless they are set already. It finds nothing and changes nothing on a machine without a toolkit.
function(pom_ext_hint_cuda_toolkit)
  if(NOT CUDA_TOOLKIT_ROOT_DIR)
    set(_candidates)
    foreach(_var CUDAToolkit_ROOT CUDA_HOME CUDA_PATH)
      if(DEFINED ${_var} AND NOT "${${_var}}" STREQUAL "")
        list(APPEND _candidates "${${_var}}")
      endif()
      if(DEFINED ENV{${_var}} AND NOT "$ENV{${_var}}" STREQUAL "")
        list(APPEND _candidates "$ENV{${_var}}")
      endif()
    endforeach()
    find_program(_pom_ext_nvcc nvcc)
    if(_pom_ext_nvcc)
      get_filename_component(_real "${_pom_ext_nvcc}" REALPATH)
      get_filename_component(_bin "${_real}" DIRECTORY)
      get_filename_component(_root "${_bin}" DIRECTORY)
      list(APPEND _candidates "${_root}")
    endif()
    unset(_pom_ext_nvcc CACHE)
    file(GLOB _versioned LIST_DIRECTORIES true "/usr/local/cuda-*")
    list(SORT _versioned COMPARE NATURAL ORDER DESCENDING)
    list(APPEND _candidates "/usr/local/cuda" ${_versioned} "/opt/cuda")
    foreach(_dir IN LISTS _candidates)
      if(EXISTS "${_dir}/bin/nvcc" AND EXISTS "${_dir}/include/cuda_runtime.h")
        get_filename_component(_dir "${_dir}" REALPATH)
        set(CUDA_TOOLKIT_ROOT_DIR "${_dir}" PARENT_SCOPE)
        set(CUDA_TOOLKIT_ROOT_DIR "${_dir}")
        if(NOT CUDAToolkit_ROOT)
          set(CUDAToolkit_ROOT "${_dir}" PARENT_SCOPE)
        endif()
        if(NOT CMAKE_CUDA_COMPILER)
          set(CMAKE_CUDA_COMPILER "${_dir}/bin/nvcc" PARENT_SCOPE)
        endif()
        break()
      endif()
    endforeach()
  endif()
  if(NOT CUDA_nvrtc_LIBRARY AND CUDA_TOOLKIT_ROOT_DIR)
    set(_nvrtc_dirs "${CUDA_TOOLKIT_ROOT_DIR}/lib64" "${CUDA_TOOLKIT_ROOT_DIR}/lib")
    # A pip-installed torch: <site-packages>/torch/share/cmake on the prefix path, its CUDA libraries in
    # <site-packages>/nvidia/*/lib.
    foreach(_p IN LISTS CMAKE_PREFIX_PATH Torch_DIR)
      if(_p MATCHES "^(.*)/torch/share/cmake")
        file(GLOB _lib_dirs LIST_DIRECTORIES true "${CMAKE_MATCH_1}/nvidia/*/lib")
        list(APPEND _nvrtc_dirs ${_lib_dirs})
      endif()
    endforeach()
    foreach(_dir IN LISTS _nvrtc_dirs)
      file(GLOB _nvrtc "${_dir}/libnvrtc.so" "${_dir}/libnvrtc.so.[0-9]*")
      if(_nvrtc)
        list(SORT _nvrtc)
        list(GET _nvrtc 0 _nvrtc)
        set(CUDA_nvrtc_LIBRARY "${_nvrtc}" CACHE FILEPATH "libnvrtc for torch's CUDA targets")
        break()
      endif()
    endforeach()
  endif()
endfunction()

# pom_ext_keep_linked(<target> <library target>): <target> (an INTERFACE target) links <library target> and,
# with GNU-style linkers, keeps it as a needed library even under --as-needed: the ops register themselves when the
# library loads, so a program that reaches them only through the dispatcher (a TorchScript or AOTInductor model)
# references none of its symbols. The flag is scoped to this one library (push-state / pop-state).
function(pom_ext_keep_linked target library)
  set_property(TARGET ${target} APPEND PROPERTY INTERFACE_LINK_LIBRARIES ${library})
  if(NOT APPLE AND NOT WIN32)
    set_property(TARGET ${target} APPEND PROPERTY INTERFACE_LINK_LIBRARIES
        "-Wl,--push-state,--no-as-needed,$<TARGET_FILE:${library}>,--pop-state")
  endif()
endfunction()
