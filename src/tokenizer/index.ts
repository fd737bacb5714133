export {
    HfTokenizer,
    TOKENIZER_FOLDER_FILES,
    TOKENIZER_FILE_NAME,
    TOKENIZER_CONFIG_FILE_NAME,
    CHAT_TEMPLATE_FILE_NAME
} from "./tokenizer.js";
export type {
    ChatMessage,
    SpecialToken,
    EncodeOptions,
    DecodeOptions,
    ChatTemplateOptions,
    StreamDecoder
} from "./tokenizer.js";
